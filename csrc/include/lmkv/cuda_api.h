// The C entry points of csrc/cuda/*.cu and the host helpers their callers need, in one header.
//
// Torch-free: included by every .cu file (so a definition that drifts from its declaration is a compile error:
// extern "C" functions cannot overload) and by csrc/cuda/bindings.cpp, the only file that knows torch. Every
// launcher is asynchronous on the `stream` it is given and returns the cudaError_t of its launches.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lmkv/paged.h"

namespace lmkv {
namespace paged {

// Everything a paged launch needs besides the device arrays (layer pointers and views). head_dim is in words;
// slots >= capacity (NB * BS) are skipped, so a direct torch.ops call cannot write out of bounds.
struct CopyShape {
  int64_t num_layers, planes, tokens, heads, head_dim, block_size;
  int64_t slot_stride;
  int64_t capacity;
};

// The widest word (bytes) that divides every stride, the row and every base address, given host copies of the
// views/pointers in ELEMENTS of `elem` bytes. `elem` when the head dim is strided on either side.
inline int32_t widest_word(const LayerView* views, const char* const* layer_ptrs, int64_t num_layers,
                           const ChunkView& chunk, const char* chunk_ptr, int64_t head_dim, int64_t elem) {
  if (chunk.dim != 1) return static_cast<int32_t>(elem);
  for (int64_t l = 0; l < num_layers; ++l)
    if (views[l].dim != 1) return static_cast<int32_t>(elem);
  for (int32_t word = 16; word > elem; word /= 2) {
    bool ok = (head_dim * elem) % word == 0 && reinterpret_cast<uintptr_t>(chunk_ptr) % word == 0;
    const int64_t cs[4] = {chunk.layer, chunk.plane, chunk.token, chunk.head};
    for (int64_t s : cs) ok = ok && (s * elem) % word == 0;
    for (int64_t l = 0; ok && l < num_layers; ++l) {
      const LayerView& v = views[l];
      const int64_t vs[5] = {v.base, v.plane, v.block, v.offset, v.head};
      for (int64_t s : vs) ok = ok && (s * elem) % word == 0;
      ok = ok && reinterpret_cast<uintptr_t>(layer_ptrs[l]) % word == 0;
    }
    if (ok) return word;
  }
  return static_cast<int32_t>(elem);
}

// A view in elements of `elem` bytes re-expressed in words of `word` bytes (widest_word() said every stride
// divides; the dim stride stays 1).
inline LayerView to_words(LayerView v, int64_t elem, int64_t word) {
  const int64_t r = word / elem;
  if (r == 1) return v;
  return {v.base / r, v.plane / r, v.block / r, v.offset / r, v.head / r, v.dim};
}

inline ChunkView to_words(ChunkView c, int64_t elem, int64_t word) {
  const int64_t r = word / elem;
  if (r == 1) return c;
  return {c.layer / r, c.plane / r, c.token / r, c.head / r, c.dim};
}

}  // namespace paged
}  // namespace lmkv

extern "C" {

// ---- paged (csrc/cuda/paged.cu) ------------------------------------------------------------------------------
// layer_ptrs/views: DEVICE arrays of num_layers entries; views, chunk strides and head_dim in words of
// `word_bytes` (1, 2, 4, 8 or 16; see widest_word/to_words). chunk_ptr may be device memory or pinned host
// memory (reached through unified addressing). cudaErrorInvalidValue for tokens >= 2^31, layers * planes > 65535
// or another word size.
cudaError_t lmkv_paged_copy_cuda(int gather, char* const* layer_ptrs, const lmkv::paged::LayerView* views,
                                 char* chunk_ptr, lmkv::paged::ChunkView chunk, const int64_t* slots,
                                 lmkv::paged::CopyShape shape, int word_bytes, cudaStream_t stream);

// BlockMap layouts: layer_ptrs/block_strides DEVICE arrays, offsets the DEVICE [2, BS, H, D] int64 table;
// everything in ELEMENTS of `elem_bytes` (1, 2, 4 or 8); shape.planes is 2.
cudaError_t lmkv_paged_copy_mapped_cuda(int gather, char* const* layer_ptrs, const int64_t* block_strides,
                                        const int64_t* offsets, char* chunk_ptr, lmkv::paged::ChunkView chunk,
                                        const int64_t* slots, lmkv::paged::CopyShape shape, int elem_bytes,
                                        cudaStream_t stream);

// ---- codec (csrc/cuda/codec.cu) ------------------------------------------------------------------------------
// Bytes of scratch the encoder needs: S slots of the worst-case stream size.
uint64_t lmkv_codec_scratch_bytes(int64_t S, int64_t T);

// Encode S streams into scratch slots; lengths[s] = bytes of stream s (-1 if it overflowed: a bad table), and
// offsets[S + 1] their exclusive prefix sum (offsets[S] = payload bytes).
cudaError_t lmkv_codec_encode_cuda(const uint8_t* sym, int64_t S, int64_t T, int64_t stride_s, int64_t stride_t,
                                   const int32_t* cdf, int W, uint8_t* scratch, int64_t* lengths, int64_t* offsets,
                                   cudaStream_t stream);

// Copy the S coded slots to one contiguous payload `out` of offsets[S] bytes.
cudaError_t lmkv_codec_compact_cuda(const uint8_t* scratch, int64_t S, int64_t T, const int64_t* offsets,
                                    uint8_t* out, cudaStream_t stream);

// Decode S streams (stream s = data[offsets[s], offsets[s + 1])) of T symbols each into sym.
cudaError_t lmkv_codec_decode_cuda(const uint8_t* data, const int64_t* offsets, int64_t S, int64_t T,
                                   const int32_t* cdf, int W, uint8_t* sym, int64_t stride_s, int64_t stride_t,
                                   cudaStream_t stream);

// ---- blend (csrc/cuda/blend.cu) ------------------------------------------------------------------------------
// Contiguous [M, T, H, D] keys (rows = M * T * H), int64 delta [T], fp32 inv_freq [R/2]; in and out must not
// alias. The half types travel as their bits (uint16_t) so that this header needs no cuda_fp16.h.
cudaError_t lmkv_blend_rerotate_f32(const float* in, float* out, const int64_t* delta, const float* inv_freq,
                                    int64_t rows, int64_t tokens, int64_t heads, int64_t head_dim,
                                    int64_t rotary_dim, cudaStream_t stream);
cudaError_t lmkv_blend_rerotate_f16(const uint16_t* in, uint16_t* out, const int64_t* delta, const float* inv_freq,
                                    int64_t rows, int64_t tokens, int64_t heads, int64_t head_dim,
                                    int64_t rotary_dim, cudaStream_t stream);
cudaError_t lmkv_blend_rerotate_bf16(const uint16_t* in, uint16_t* out, const int64_t* delta,
                                     const float* inv_freq, int64_t rows, int64_t tokens, int64_t heads,
                                     int64_t head_dim, int64_t rotary_dim, cudaStream_t stream);

// ---- hashing (csrc/cuda/hashing.cu; not bound yet: prompts are hashed on the CPU) ------------------------------
cudaError_t lmkv_hashing_chunk_keys_cuda(const uint32_t* tokens, const int64_t* leaf_start, const int64_t* leaf_len,
                                         int64_t num_leaves, const int64_t* first, int64_t num_seqs,
                                         const uint8_t* root, uint32_t* leaves_scratch, uint8_t* keys,
                                         cudaStream_t stream);

}  // extern "C"
