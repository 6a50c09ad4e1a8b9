// CacheGen range coder, CUDA: one thread per stream for encode and decode, plus the scan and compaction that
// turn worst-case slots into one contiguous payload. Torch-free: plain CUDA runtime, raw pointers, cudaStream_t.
// Limits: the arithmetic is lmkv/rangecoder.h (identical bytes to the CPU coder and the Python reference); one
// thread per stream means a GPU needs thousands of streams (L * P * H * D) to be busy; tables are read from
// global memory through L1; alphabets up to 256 symbols. Bound into torch by csrc/cuda/bindings.cpp; CI compile-checks it.
#include <cuda_runtime.h>
#include <stdint.h>

#include "lmkv/cuda_api.h"
#include "lmkv/rangecoder.h"

namespace {

constexpr int kThreads = 128;
constexpr int kScanThreads = 1024;

// symbols: element (s, t) at sym[s * stride_s + t * stride_t]; [S, T] row-major is (T, 1), [T, S] is (1, S).
__global__ void encode_kernel(const uint8_t* __restrict__ sym, int64_t S, int64_t T, int64_t stride_s,
                              int64_t stride_t, const int32_t* __restrict__ cdf, int W, uint8_t* __restrict__ scratch,
                              uint64_t slot, int64_t* __restrict__ lengths) {
  int64_t s = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= S) return;
  const int32_t* tab = cdf + s * (int64_t)W;
  lmkv::rc::Encoder e;
  e.init(scratch + (uint64_t)s * slot, slot);
  for (int64_t t = 0; t < T; ++t) {
    uint32_t v = sym[s * stride_s + t * stride_t];
    uint32_t lo = (uint32_t)tab[v];
    e.encode(lo, (uint32_t)tab[v + 1] - lo);
  }
  uint64_t len = e.finish();
  lengths[s] = e.overflow ? -1 : (int64_t)len;
}

// Exclusive prefix sum of lengths[S] into offsets[S + 1] with one block: each thread sums a slice, the block
// scans the partial sums in shared memory, then each thread writes its slice.
__global__ void scan_kernel(const int64_t* __restrict__ lengths, int64_t S, int64_t* __restrict__ offsets) {
  __shared__ int64_t part[kScanThreads];
  int64_t per = (S + kScanThreads - 1) / kScanThreads;
  int64_t begin = threadIdx.x * per;
  int64_t end = begin + per < S ? begin + per : S;
  int64_t sum = 0;
  for (int64_t i = begin; i < end; ++i) sum += lengths[i] > 0 ? lengths[i] : 0;
  part[threadIdx.x] = sum;
  __syncthreads();
  for (int d = 1; d < kScanThreads; d <<= 1) {
    int64_t add = threadIdx.x >= (unsigned)d ? part[threadIdx.x - d] : 0;
    __syncthreads();
    part[threadIdx.x] += add;
    __syncthreads();
  }
  int64_t run = part[threadIdx.x] - sum;
  for (int64_t i = begin; i < end; ++i) {
    offsets[i] = run;
    run += lengths[i] > 0 ? lengths[i] : 0;
  }
  if (threadIdx.x == kScanThreads - 1) offsets[S] = part[kScanThreads - 1];
}

// One block per stream copies its slot to its offset.
__global__ void compact_kernel(const uint8_t* __restrict__ scratch, uint64_t slot, const int64_t* __restrict__ offsets,
                               int64_t S, uint8_t* __restrict__ out) {
  int64_t s = blockIdx.x;
  if (s >= S) return;
  int64_t n = offsets[s + 1] - offsets[s];
  const uint8_t* src = scratch + (uint64_t)s * slot;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[offsets[s] + i] = src[i];
}

__global__ void decode_kernel(const uint8_t* __restrict__ data, const int64_t* __restrict__ offsets, int64_t S,
                              int64_t T, const int32_t* __restrict__ cdf, int W, uint8_t* __restrict__ sym,
                              int64_t stride_s, int64_t stride_t) {
  int64_t s = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= S) return;
  const int32_t* tab = cdf + s * (int64_t)W;
  lmkv::rc::Decoder d;
  d.init(data + offsets[s], (uint64_t)(offsets[s + 1] - offsets[s]));
  for (int64_t t = 0; t < T; ++t) sym[s * stride_s + t * stride_t] = (uint8_t)d.decode(tab, W - 1);
}

inline unsigned blocks_for(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

}  // namespace

extern "C" {

// Bytes of scratch the encoder needs: S slots of the worst-case stream size.
uint64_t lmkv_codec_scratch_bytes(int64_t S, int64_t T) { return (uint64_t)S * lmkv::rc::max_stream_bytes(T); }

// Encode S streams into scratch slots; lengths[s] = bytes of stream s (-1 if it overflowed: a bad table), and
// offsets[S + 1] their exclusive prefix sum (offsets[S] = payload bytes). Asynchronous on `stream`.
cudaError_t lmkv_codec_encode_cuda(const uint8_t* sym, int64_t S, int64_t T, int64_t stride_s, int64_t stride_t,
                                   const int32_t* cdf, int W, uint8_t* scratch, int64_t* lengths, int64_t* offsets,
                                   cudaStream_t stream) {
  if (S <= 0) return cudaSuccess;
  uint64_t slot = lmkv::rc::max_stream_bytes(T);
  encode_kernel<<<blocks_for(S, kThreads), kThreads, 0, stream>>>(sym, S, T, stride_s, stride_t, cdf, W, scratch,
                                                                  slot, lengths);
  scan_kernel<<<1, kScanThreads, 0, stream>>>(lengths, S, offsets);
  return cudaGetLastError();
}

// Copy the S coded slots to one contiguous payload `out` of offsets[S] bytes.
cudaError_t lmkv_codec_compact_cuda(const uint8_t* scratch, int64_t S, int64_t T, const int64_t* offsets,
                                    uint8_t* out, cudaStream_t stream) {
  if (S <= 0) return cudaSuccess;
  compact_kernel<<<(unsigned)S, 128, 0, stream>>>(scratch, lmkv::rc::max_stream_bytes(T), offsets, S, out);
  return cudaGetLastError();
}

// Decode S streams (stream s = data[offsets[s], offsets[s + 1])) of T symbols each into sym.
cudaError_t lmkv_codec_decode_cuda(const uint8_t* data, const int64_t* offsets, int64_t S, int64_t T,
                                   const int32_t* cdf, int W, uint8_t* sym, int64_t stride_s, int64_t stride_t,
                                   cudaStream_t stream) {
  if (S <= 0) return cudaSuccess;
  decode_kernel<<<blocks_for(S, kThreads), kThreads, 0, stream>>>(data, offsets, S, T, cdf, W, sym, stride_s,
                                                                  stride_t);
  return cudaGetLastError();
}

}  // extern "C"
