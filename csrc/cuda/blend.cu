// CUDA RoPE re-rotation for CacheBlend, torch-free (plain CUDA runtime, raw pointers, a caller's stream).
// Bound into torch by csrc/cuda/bindings.cpp.
// Limits: contiguous [M, T, H, D] keys (fp32 / fp16 / bf16), int64 deltas [T], fp32 inv_freq [R/2]; one thread per
// (row, frequency) pair; in and out must not alias. Compile-checked in CI (no GPU there); the math is
// lmkv/blend.h, shared with the CPU build. Launchers return the cudaError_t of the launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lmkv/blend.h"
#include "lmkv/cuda_api.h"

namespace {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void rerotate_kernel(const T* __restrict__ in, T* __restrict__ out, const int64_t* __restrict__ delta,
                                const float* __restrict__ inv_freq, int64_t rows, int64_t tokens, int64_t heads,
                                int64_t head_dim, int64_t rotary_dim) {
  const int64_t half = rotary_dim / 2;
  const int64_t pass = head_dim - rotary_dim;
  const int64_t per_row = half + pass;  // one thread per rotated pair or passed-through dim
  const int64_t total = rows * per_row;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / per_row;
    const int64_t j = idx - row * per_row;
    const T* src = in + row * head_dim;
    T* dst = out + row * head_dim;
    if (j < half) {
      const int64_t t = lmkv::blend::token_of_row(row, tokens, heads);
      float s, c;
      sincosf(lmkv::blend::rope_angle(delta[t], inv_freq[j]), &s, &c);
      float o1, o2;
      lmkv::blend::rotate_pair(to_f32(src[j]), to_f32(src[j + half]), c, s, &o1, &o2);
      dst[j] = from_f32<T>(o1);
      dst[j + half] = from_f32<T>(o2);
    } else {
      const int64_t d = rotary_dim + (j - half);
      dst[d] = src[d];
    }
  }
}

template <typename T>
cudaError_t launch(const T* in, T* out, const int64_t* delta, const float* inv_freq, int64_t rows, int64_t tokens,
                   int64_t heads, int64_t head_dim, int64_t rotary_dim, cudaStream_t stream) {
  const int64_t total = rows * (head_dim - rotary_dim / 2);
  if (total <= 0) return cudaSuccess;
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 65535 * 32) blocks = 65535 * 32;  // grid-stride loop covers the rest
  rerotate_kernel<T><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
      in, out, delta, inv_freq, rows, tokens, heads, head_dim, rotary_dim);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

cudaError_t lmkv_blend_rerotate_f32(const float* in, float* out, const int64_t* delta, const float* inv_freq,
                                    int64_t rows, int64_t tokens, int64_t heads, int64_t head_dim,
                                    int64_t rotary_dim, cudaStream_t stream) {
  return launch(in, out, delta, inv_freq, rows, tokens, heads, head_dim, rotary_dim, stream);
}

cudaError_t lmkv_blend_rerotate_f16(const uint16_t* in, uint16_t* out, const int64_t* delta, const float* inv_freq,
                                    int64_t rows, int64_t tokens, int64_t heads, int64_t head_dim,
                                    int64_t rotary_dim, cudaStream_t stream) {
  return launch(reinterpret_cast<const __half*>(in), reinterpret_cast<__half*>(out), delta, inv_freq, rows, tokens,
                heads, head_dim, rotary_dim, stream);
}

cudaError_t lmkv_blend_rerotate_bf16(const uint16_t* in, uint16_t* out, const int64_t* delta,
                                     const float* inv_freq, int64_t rows, int64_t tokens, int64_t heads,
                                     int64_t head_dim, int64_t rotary_dim, cudaStream_t stream) {
  return launch(reinterpret_cast<const __nv_bfloat16*>(in), reinterpret_cast<__nv_bfloat16*>(out), delta, inv_freq,
                rows, tokens, heads, head_dim, rotary_dim, stream);
}

}  // extern "C"
