// Paged gather/scatter on CUDA (torch-free; hipify translates it for ROCm).
//
// Bound into torch by csrc/cuda/bindings.cpp (lmkv.optimized.cuda builds both); CI compile-checks them.
// One thread block per (token, layer * plane) row; its threads move the H x D row as words of `word_bytes`
// (1, 2, 4, 8 or 16 bytes). The caller chooses the word with widest_word() and expresses the layer views and
// chunk strides in words with to_words() (lmkv/cuda_api.h); the index math is lmkv/paged.h, shared with the CPU
// op. The chunk may live in pinned host memory: unified addressing lets the kernel reach it over PCIe.
// Layers may be separate allocations (an array of device pointers) with different strides. Duplicate scatter
// slots race (the Python layer rejects them). Negative slots and slots >= capacity are skipped.
#include <cuda_runtime.h>

#include <cstdint>

#include "lmkv/cuda_api.h"

namespace lmkv {
namespace paged {

template <typename Word, bool kGather>
__global__ void paged_copy_kernel(char* const* layers, const LayerView* views, char* chunk_base, ChunkView chunk,
                                  const int64_t* slots, CopyShape shape) {
  const int64_t t = blockIdx.x;
  const int64_t lp = blockIdx.y;
  const int64_t slot = slots[t * shape.slot_stride];
  if (slot < 0 || slot >= shape.capacity) return;
  const int64_t layer = lp / shape.planes;
  const int64_t plane = lp % shape.planes;
  const LayerView v = views[layer];
  Word* cache = reinterpret_cast<Word*>(layers[layer]);
  Word* out = reinterpret_cast<Word*>(chunk_base);
  const int64_t row = shape.heads * shape.head_dim;
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
    const int64_t h = i / shape.head_dim;
    const int64_t d = i % shape.head_dim;
    const int64_t ci = cache_index(v, slot, shape.block_size, plane, h) + d * v.dim;
    const int64_t ki = chunk_index(chunk, layer, plane, t, h) + d * chunk.dim;
    if (kGather) {
      out[ki] = cache[ci];
    } else {
      cache[ci] = out[ki];
    }
  }
}

template <typename Word>
cudaError_t launch_word(bool gather, char* const* layers, const LayerView* views, char* chunk_base,
                        const ChunkView& chunk, const int64_t* slots, const CopyShape& shape, cudaStream_t stream) {
  const int64_t row = shape.heads * shape.head_dim;
  const int threads = row >= 256 ? 256 : static_cast<int>(((row + 31) / 32) * 32);
  const dim3 grid(static_cast<unsigned>(shape.tokens), static_cast<unsigned>(shape.num_layers * shape.planes));
  if (gather) {
    paged_copy_kernel<Word, true><<<grid, threads, 0, stream>>>(layers, views, chunk_base, chunk, slots, shape);
  } else {
    paged_copy_kernel<Word, false><<<grid, threads, 0, stream>>>(layers, views, chunk_base, chunk, slots, shape);
  }
  return cudaGetLastError();
}

// BlockMap layouts: one thread block per (token, layer * 2) row, one element per thread step. `layers` are device
// pointers to each layer's first block, `block_strides` elements between blocks, `offsets` the [2, BS, H, D]
// table on the device (lmkv/paged.h: mapped_row).
template <typename Elem, bool kGather>
__global__ void paged_mapped_kernel(char* const* layers, const int64_t* block_strides, const int64_t* offsets,
                                    char* chunk_base, ChunkView chunk, const int64_t* slots, CopyShape shape) {
  const int64_t t = blockIdx.x;
  const int64_t lp = blockIdx.y;
  const int64_t slot = slots[t * shape.slot_stride];
  if (slot < 0 || slot >= shape.capacity) return;
  const int64_t layer = lp / 2;
  const int64_t plane = lp % 2;
  Elem* block = reinterpret_cast<Elem*>(layers[layer]) + (slot / shape.block_size) * block_strides[layer];
  Elem* out = reinterpret_cast<Elem*>(chunk_base);
  const int64_t row = shape.heads * shape.head_dim;
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
    const int64_t h = i / shape.head_dim;
    const int64_t d = i % shape.head_dim;
    const int64_t cell = offsets[mapped_row(shape.block_size, shape.heads, shape.head_dim, plane,
                                            slot % shape.block_size, h) + d];
    const int64_t ki = chunk_index(chunk, layer, plane, t, h) + d * chunk.dim;
    if (kGather) {
      out[ki] = block[cell];
    } else {
      block[cell] = out[ki];
    }
  }
}

template <typename Elem>
cudaError_t launch_mapped(bool gather, char* const* layers, const int64_t* block_strides, const int64_t* offsets,
                          char* chunk_base, const ChunkView& chunk, const int64_t* slots, const CopyShape& shape,
                          cudaStream_t stream) {
  const int64_t row = shape.heads * shape.head_dim;
  const int threads = row >= 256 ? 256 : static_cast<int>(((row + 31) / 32) * 32);
  const dim3 grid(static_cast<unsigned>(shape.tokens), static_cast<unsigned>(shape.num_layers * 2));
  if (gather) {
    paged_mapped_kernel<Elem, true><<<grid, threads, 0, stream>>>(layers, block_strides, offsets, chunk_base, chunk,
                                                                  slots, shape);
  } else {
    paged_mapped_kernel<Elem, false><<<grid, threads, 0, stream>>>(layers, block_strides, offsets, chunk_base,
                                                                   chunk, slots, shape);
  }
  return cudaGetLastError();
}

}  // namespace paged
}  // namespace lmkv

// C entry point for BlockMap layouts; everything in ELEMENTS of `elem_bytes` (1, 2, 4 or 8); shape.planes is 2.
extern "C" cudaError_t lmkv_paged_copy_mapped_cuda(int gather, char* const* layer_ptrs, const int64_t* block_strides,
                                                   const int64_t* offsets, char* chunk_ptr,
                                                   lmkv::paged::ChunkView chunk, const int64_t* slots,
                                                   lmkv::paged::CopyShape shape, int elem_bytes,
                                                   cudaStream_t stream) {
  using namespace lmkv::paged;
  if (shape.tokens <= 0 || shape.num_layers <= 0) return cudaSuccess;
  if (shape.tokens >= (int64_t{1} << 31) || shape.num_layers * 2 > 65535) return cudaErrorInvalidValue;
  const bool g = gather != 0;
  switch (elem_bytes) {
    case 1: return launch_mapped<uint8_t>(g, layer_ptrs, block_strides, offsets, chunk_ptr, chunk, slots, shape, stream);
    case 2: return launch_mapped<uint16_t>(g, layer_ptrs, block_strides, offsets, chunk_ptr, chunk, slots, shape, stream);
    case 4: return launch_mapped<uint32_t>(g, layer_ptrs, block_strides, offsets, chunk_ptr, chunk, slots, shape, stream);
    case 8: return launch_mapped<uint64_t>(g, layer_ptrs, block_strides, offsets, chunk_ptr, chunk, slots, shape, stream);
    default: return cudaErrorInvalidValue;
  }
}

// C entry point. layer_ptrs/views are DEVICE arrays of num_layers entries; views, chunk strides and head_dim are
// in words of `word_bytes` (see widest_word/to_words). Returns cudaErrorInvalidValue for shapes the grid cannot
// hold (tokens >= 2^31, layers * planes > 65535) or an unsupported word size.
extern "C" cudaError_t lmkv_paged_copy_cuda(int gather, char* const* layer_ptrs, const lmkv::paged::LayerView* views,
                                            char* chunk_ptr, lmkv::paged::ChunkView chunk, const int64_t* slots,
                                            lmkv::paged::CopyShape shape, int word_bytes, cudaStream_t stream) {
  using namespace lmkv::paged;
  if (shape.tokens <= 0 || shape.num_layers <= 0) return cudaSuccess;
  if (shape.tokens >= (int64_t{1} << 31) || shape.num_layers * shape.planes > 65535) return cudaErrorInvalidValue;
  const bool g = gather != 0;
  switch (word_bytes) {
    case 1: return launch_word<uint8_t>(g, layer_ptrs, views, chunk_ptr, chunk, slots, shape, stream);
    case 2: return launch_word<uint16_t>(g, layer_ptrs, views, chunk_ptr, chunk, slots, shape, stream);
    case 4: return launch_word<uint32_t>(g, layer_ptrs, views, chunk_ptr, chunk, slots, shape, stream);
    case 8: return launch_word<uint2>(g, layer_ptrs, views, chunk_ptr, chunk, slots, shape, stream);
    case 16: return launch_word<uint4>(g, layer_ptrs, views, chunk_ptr, chunk, slots, shape, stream);
    default: return cudaErrorInvalidValue;
  }
}
