// Index math of paged gather/scatter, shared by csrc/cpu/paged.cpp and csrc/cuda/paged.cu.
//
// Torch-free and CUDA-free: plain C++17 that nvcc/hipcc compile for the device too (LMKV_HD).
// The layout table mirrors LAYOUT_AXES in lmkv/layouts.py (layout code = index in LAYOUTS there).
// Strides and offsets are in ELEMENTS and int64: a multi-GiB cache overflows int32 offsets.
#pragma once

#include <cstdint>

#include "lmkv/common.h"

namespace lmkv {
namespace paged {

enum Layout : int32_t {
  kFlashAttn = 0,       // per layer [2, NB, BS, H, D]
  kBlocksFirst = 1,     // per layer [NB, 2, BS, H, D]
  kFlashAttnHnd = 2,    // per layer [2, NB, H, BS, D]
  kBlocksFirstHnd = 3,  // per layer [NB, 2, H, BS, D]
  kMla = 4,             // per layer [NB, BS, D]
  kCrossLayer = 5,      // one tensor [NB, L, 2, BS, H, D]
  kNumLayouts = 6,
};

// Where each logical axis sits in the engine tensor's own dim order; -1 when the layout has no such axis.
struct Axes {
  int32_t layer, plane, block, offset, head, dim;
};

LMKV_HD Axes layout_axes(int32_t layout) {
  switch (layout) {
    case kFlashAttn: return {-1, 0, 1, 2, 3, 4};
    case kBlocksFirst: return {-1, 1, 0, 2, 3, 4};
    case kFlashAttnHnd: return {-1, 0, 1, 3, 2, 4};
    case kBlocksFirstHnd: return {-1, 1, 0, 3, 2, 4};
    case kMla: return {-1, -1, 0, 1, -1, 2};
    default: return {1, 2, 0, 3, 4, 5};  // kCrossLayer
  }
}

LMKV_HD int32_t layout_ndim(int32_t layout) {
  return layout == kMla ? 3 : (layout == kCrossLayer ? 6 : 5);
}

LMKV_HD bool layout_valid(int32_t layout) { return layout >= 0 && layout < kNumLayouts; }

// One layer of the cache as the canonical [P, NB, BS, H, D] view: an element offset from the tensor's data
// pointer (non-zero only for cross_layer) and one stride per canonical axis (0 for the axes MLA lacks).
struct LayerView {
  int64_t base, plane, block, offset, head, dim;
};

LMKV_HD int64_t stride_or_zero(const int64_t* strides, int32_t axis) { return axis >= 0 ? strides[axis] : 0; }

// `strides` are the engine tensor's strides in its own dim order.
LMKV_HD LayerView layer_view(int32_t layout, const int64_t* strides, int64_t layer) {
  const Axes a = layout_axes(layout);
  LayerView v;
  v.base = a.layer >= 0 ? layer * strides[a.layer] : 0;
  v.plane = stride_or_zero(strides, a.plane);
  v.block = strides[a.block];
  v.offset = strides[a.offset];
  v.head = stride_or_zero(strides, a.head);
  v.dim = strides[a.dim];
  return v;
}

// The chunk [L, P, T, H, D] (MLA: [L, 1, T, D], i.e. no head axis).
struct ChunkView {
  int64_t layer, plane, token, head, dim;
};

LMKV_HD ChunkView chunk_view(bool mla, const int64_t* strides) {
  ChunkView c;
  c.layer = strides[0];
  c.plane = strides[1];
  c.token = strides[2];
  c.head = mla ? 0 : strides[3];
  c.dim = mla ? strides[3] : strides[4];
  return c;
}

// Element index, within one layer, of (plane, slot, head, dim 0). Negative slots are never passed here.
LMKV_HD int64_t cache_index(const LayerView& v, int64_t slot, int64_t block_size, int64_t plane, int64_t head) {
  return v.base + plane * v.plane + (slot / block_size) * v.block + (slot % block_size) * v.offset + head * v.head;
}

LMKV_HD int64_t chunk_index(const ChunkView& c, int64_t layer, int64_t plane, int64_t token, int64_t head) {
  return layer * c.layer + plane * c.plane + token * c.token + head * c.head;
}

// How many elements of one token's [H, D] row are contiguous on BOTH sides, starting at each head:
// H*D (the whole row is one run), D (one run per head), or 1 (strided head dim: element by element).
LMKV_HD int64_t run_elems(const LayerView& v, const ChunkView& c, int64_t heads, int64_t head_dim) {
  if (v.dim != 1 || c.dim != 1) return 1;
  if (heads == 1 || (v.head == head_dim && c.head == head_dim)) return heads * head_dim;
  return head_dim;
}

// A BlockMap layout (lmkv/layouts.py): the inside of a block is a table, not strides. `offsets` is the
// contiguous int64 [2, BS, H, D] table; element (plane, o, head, dim) of block b sits at
//   b * block_stride + offsets[mapped_row(...) + dim]            (elements from the layer's data pointer).
LMKV_HD int64_t mapped_row(int64_t block_size, int64_t heads, int64_t head_dim, int64_t plane, int64_t offset,
                           int64_t head) {
  return ((plane * block_size + offset) * heads + head) * head_dim;
}

// Whether the D offsets of a table row are consecutive (a memcpy-able run in the cache).
LMKV_HD bool mapped_row_is_run(const int64_t* row, int64_t head_dim) {
  for (int64_t d = 1; d < head_dim; ++d)
    if (row[d] != row[0] + d) return false;
  return true;
}

}  // namespace paged
}  // namespace lmkv
