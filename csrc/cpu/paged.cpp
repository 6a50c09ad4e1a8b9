// Paged gather/scatter on CPU: torch.ops.lmkv.paged_gather / paged_scatter.
//
// Limits: CPU tensors only; moves raw bytes (element sizes 1, 2, 4, 8), so every dtype is bit-exact.
// Parallel over (layer, plane, token) with at::parallel_for (honours torch.set_num_threads). Each token row is
// copied with memcpy when its innermost dims are contiguous on both sides, else element by element. Tensors are
// read and written through their own strides (views are never copied). The Python layer validates arguments;
// the checks here guard direct torch.ops calls and run before anything is written. Duplicate scatter slots are
// not detected here (lmkv.ops.paged rejects them): the last writer wins, nondeterministically.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "lmkv/paged.h"

namespace {

using lmkv::paged::ChunkView;
using lmkv::paged::LayerView;

struct Plan {
  std::vector<char*> layers;  // data pointer of each layer tensor (cross_layer: the one tensor, L times)
  std::vector<LayerView> views;
  ChunkView chunk_strides;
  char* chunk = nullptr;
  const int64_t* slots = nullptr;
  int64_t slot_stride = 1, num_layers = 0, planes = 2, tokens = 0, heads = 0, head_dim = 0, block_size = 0;
  int64_t elem = 0;
};

// Checks slot_mapping (1-D int64 CPU, every slot < capacity) before anything is written; returns its pointer,
// stride and length.
void check_slots(const at::Tensor& slot_mapping, int64_t capacity, const int64_t** slots, int64_t* stride,
                 int64_t* tokens) {
  TORCH_CHECK(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1,
              "slot_mapping must be a 1-D int64 CPU tensor");
  *tokens = slot_mapping.size(0);
  *slots = slot_mapping.data_ptr<int64_t>();
  *stride = slot_mapping.stride(0);
  for (int64_t t = 0; t < *tokens; ++t) {
    TORCH_CHECK((*slots)[t * *stride] < capacity, "slot_mapping[", t, "] = ", (*slots)[t * *stride],
                " is out of range (NB * BS = ", capacity, ")");
  }
}

Plan make_plan(at::TensorList caches, const at::Tensor& slot_mapping, const at::Tensor& chunk, int64_t layout64) {
  using namespace lmkv::paged;
  TORCH_CHECK(layout64 >= 0 && layout64 < kNumLayouts, "layout code must be in [0, 6), got ", layout64);
  const auto layout = static_cast<int32_t>(layout64);
  const bool mla = layout == kMla;
  TORCH_CHECK(!caches.empty(), "kv_caches is empty");
  TORCH_CHECK(layout != kCrossLayer || caches.size() == 1, "cross_layer takes exactly one kv_caches tensor");
  const at::Tensor& first = caches[0];
  TORCH_CHECK(first.dim() == layout_ndim(layout), "kv_caches[0] has ", first.dim(), " dims, layout needs ",
              layout_ndim(layout));
  const Axes axes = layout_axes(layout);
  Plan p;
  p.elem = first.element_size();
  p.num_layers = axes.layer >= 0 ? first.size(axes.layer) : static_cast<int64_t>(caches.size());
  p.planes = mla ? 1 : 2;
  p.heads = axes.head >= 0 ? first.size(axes.head) : 1;
  p.head_dim = first.size(axes.dim);
  p.block_size = first.size(axes.offset);
  TORCH_CHECK(axes.plane < 0 || first.size(axes.plane) == 2, "kv_caches: the K/V axis must have size 2");
  const int64_t capacity = first.size(axes.block) * p.block_size;
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& t = caches[i];
    TORCH_CHECK(t.device().is_cpu(), "kv_caches[", i, "] must be a CPU tensor");
    TORCH_CHECK(t.sizes().equals(first.sizes()), "kv_caches[", i, "] shape differs from kv_caches[0]");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), "kv_caches[", i, "] dtype differs from kv_caches[0]");
  }
  for (int64_t l = 0; l < p.num_layers; ++l) {
    const at::Tensor& t = caches[axes.layer >= 0 ? 0 : l];
    p.layers.push_back(static_cast<char*>(t.data_ptr()));
    p.views.push_back(layer_view(layout, t.strides().data(), axes.layer >= 0 ? l : 0));
  }
  check_slots(slot_mapping, capacity, &p.slots, &p.slot_stride, &p.tokens);
  TORCH_CHECK(chunk.device().is_cpu(), "chunk must be a CPU tensor");
  TORCH_CHECK(chunk.scalar_type() == first.scalar_type(), "chunk dtype differs from kv_caches");
  TORCH_CHECK(chunk.dim() == (mla ? 4 : 5), "chunk must be [L, 2, T, H, D] (MLA: [L, 1, T, D])");
  TORCH_CHECK(chunk.size(0) == p.num_layers && chunk.size(1) == p.planes && chunk.size(2) >= p.tokens &&
                  (mla ? chunk.size(3) == p.head_dim : (chunk.size(3) == p.heads && chunk.size(4) == p.head_dim)),
              "chunk shape ", chunk.sizes(), " does not fit the kv_caches and ", p.tokens, " slots");
  p.chunk = static_cast<char*>(chunk.data_ptr());
  p.chunk_strides = chunk_view(mla, chunk.strides().data());
  return p;
}

template <typename T>
void move_strided(char* dst, int64_t dst_stride, const char* src, int64_t src_stride, int64_t n) {
  auto* d = reinterpret_cast<T*>(dst);
  const auto* s = reinterpret_cast<const T*>(src);
  for (int64_t i = 0; i < n; ++i) d[i * dst_stride] = s[i * src_stride];
}

void move_elems(int64_t elem, char* dst, int64_t dst_stride, const char* src, int64_t src_stride, int64_t n) {
  switch (elem) {
    case 1: move_strided<uint8_t>(dst, dst_stride, src, src_stride, n); break;
    case 2: move_strided<uint16_t>(dst, dst_stride, src, src_stride, n); break;
    case 4: move_strided<uint32_t>(dst, dst_stride, src, src_stride, n); break;
    default: move_strided<uint64_t>(dst, dst_stride, src, src_stride, n); break;
  }
}

// kGather: chunk <- cache; else cache <- chunk. Work items are (layer, plane, token), token fastest, so a
// contiguous chunk is walked in memory order.
template <bool kGather>
void run(const Plan& p) {
  using lmkv::paged::cache_index;
  using lmkv::paged::chunk_index;
  const int64_t items = p.num_layers * p.planes * p.tokens;
  if (items == 0) return;
  const int64_t row_bytes = p.heads * p.head_dim * p.elem;
  const int64_t grain = std::max<int64_t>(1, (int64_t{64} << 10) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i % p.tokens;
      const int64_t lp = i / p.tokens;
      const int64_t plane = lp % p.planes, layer = lp / p.planes;
      const int64_t slot = p.slots[t * p.slot_stride];
      if (slot < 0) continue;
      const LayerView& v = p.views[layer];
      const ChunkView& c = p.chunk_strides;
      const int64_t run = lmkv::paged::run_elems(v, c, p.heads, p.head_dim);
      const int64_t heads_per_run = run >= p.head_dim ? run / p.head_dim : 1;
      for (int64_t h = 0; h < p.heads; h += heads_per_run) {
        char* cache = p.layers[layer] + cache_index(v, slot, p.block_size, plane, h) * p.elem;
        char* chunk = p.chunk + chunk_index(c, layer, plane, t, h) * p.elem;
        char* dst = kGather ? chunk : cache;
        const char* src = kGather ? cache : chunk;
        if (run > 1) {
          std::memcpy(dst, src, static_cast<size_t>(run * p.elem));
        } else {
          move_elems(p.elem, dst, kGather ? c.dim : v.dim, src, kGather ? v.dim : c.dim, p.head_dim);
        }
      }
    }
  });
}

void paged_gather(at::TensorList kv_caches, const at::Tensor& slot_mapping, const at::Tensor& out, int64_t layout) {
  run<true>(make_plan(kv_caches, slot_mapping, out, layout));
}

void paged_scatter(const at::Tensor& chunk, at::TensorList kv_caches, const at::Tensor& slot_mapping,
                   int64_t layout) {
  run<false>(make_plan(kv_caches, slot_mapping, chunk, layout));
}

// ---- BlockMap layouts: each block is a flat run of elements, its inside given by an offset table ----------

struct MappedPlan {
  std::vector<char*> layers;
  std::vector<int64_t> block_strides;  // elements between consecutive blocks, per layer
  const int64_t* offsets = nullptr;    // contiguous [2, BS, H, D]
  std::vector<uint8_t> runs;           // per (plane, offset, head): the D offsets are consecutive
  ChunkView chunk_strides;
  char* chunk = nullptr;
  const int64_t* slots = nullptr;
  int64_t slot_stride = 1, num_layers = 0, tokens = 0, heads = 0, head_dim = 0, block_size = 0, elem = 0;
};

MappedPlan make_mapped_plan(at::TensorList caches, const at::Tensor& slot_mapping, const at::Tensor& offsets,
                            const at::Tensor& chunk) {
  TORCH_CHECK(!caches.empty(), "kv_caches is empty");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 4 &&
                  offsets.size(0) == 2 && offsets.is_contiguous(),
              "offsets must be a contiguous int64 CPU tensor [2, BS, H, D]");
  MappedPlan p;
  p.block_size = offsets.size(1);
  p.heads = offsets.size(2);
  p.head_dim = offsets.size(3);
  p.offsets = offsets.data_ptr<int64_t>();
  const int64_t cells = offsets.numel();
  int64_t span = 0;
  for (int64_t i = 0; i < cells; ++i) {
    TORCH_CHECK(p.offsets[i] >= 0, "offsets must be non-negative");
    span = std::max(span, p.offsets[i] + 1);
  }
  const at::Tensor& first = caches[0];
  TORCH_CHECK(first.dim() >= 2, "kv_caches[0] must be [NB, ...] with the blocks first");
  p.elem = first.element_size();
  p.num_layers = static_cast<int64_t>(caches.size());
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& t = caches[i];
    TORCH_CHECK(t.device().is_cpu(), "kv_caches[", i, "] must be a CPU tensor");
    TORCH_CHECK(t.sizes().equals(first.sizes()), "kv_caches[", i, "] shape differs from kv_caches[0]");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), "kv_caches[", i, "] dtype differs from kv_caches[0]");
    TORCH_CHECK(t[0].is_contiguous() && t[0].numel() >= span, "kv_caches[", i, "] blocks must be contiguous runs "
                "of at least ", span, " elements");
    p.layers.push_back(static_cast<char*>(t.data_ptr()));
    p.block_strides.push_back(t.stride(0));
  }
  const int64_t capacity = first.size(0) * p.block_size;
  check_slots(slot_mapping, capacity, &p.slots, &p.slot_stride, &p.tokens);
  TORCH_CHECK(chunk.device().is_cpu() && chunk.scalar_type() == first.scalar_type() && chunk.dim() == 5 &&
                  chunk.size(0) == p.num_layers && chunk.size(1) == 2 && chunk.size(2) >= p.tokens &&
                  chunk.size(3) == p.heads && chunk.size(4) == p.head_dim,
              "chunk shape ", chunk.sizes(), " does not fit the kv_caches, the offsets and ", p.tokens, " slots");
  p.chunk = static_cast<char*>(chunk.data_ptr());
  p.chunk_strides = lmkv::paged::chunk_view(false, chunk.strides().data());
  p.runs.resize(static_cast<size_t>(cells / p.head_dim));
  for (size_t r = 0; r < p.runs.size(); ++r) {
    p.runs[r] = lmkv::paged::mapped_row_is_run(p.offsets + static_cast<int64_t>(r) * p.head_dim, p.head_dim);
  }
  return p;
}

template <typename T, bool kGather>
void move_mapped(char* block, const int64_t* row, char* chunk, int64_t chunk_stride, int64_t n) {
  auto* b = reinterpret_cast<T*>(block);
  auto* c = reinterpret_cast<T*>(chunk);
  for (int64_t d = 0; d < n; ++d) {
    if (kGather) {
      c[d * chunk_stride] = b[row[d]];
    } else {
      b[row[d]] = c[d * chunk_stride];
    }
  }
}

template <bool kGather>
void move_mapped_elems(int64_t elem, char* block, const int64_t* row, char* chunk, int64_t chunk_stride, int64_t n) {
  switch (elem) {
    case 1: move_mapped<uint8_t, kGather>(block, row, chunk, chunk_stride, n); break;
    case 2: move_mapped<uint16_t, kGather>(block, row, chunk, chunk_stride, n); break;
    case 4: move_mapped<uint32_t, kGather>(block, row, chunk, chunk_stride, n); break;
    default: move_mapped<uint64_t, kGather>(block, row, chunk, chunk_stride, n); break;
  }
}

// Work items (layer, plane, token) as in run(); per head, one memcpy when the table row is a run of consecutive
// elements and the chunk's head dim is contiguous, else one element at a time through the table.
template <bool kGather>
void run_mapped(const MappedPlan& p) {
  using lmkv::paged::chunk_index;
  using lmkv::paged::mapped_row;
  const int64_t items = p.num_layers * 2 * p.tokens;
  if (items == 0) return;
  const int64_t row_bytes = p.heads * p.head_dim * p.elem;
  const int64_t grain = std::max<int64_t>(1, (int64_t{64} << 10) / std::max<int64_t>(row_bytes, 1));
  const ChunkView& c = p.chunk_strides;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i % p.tokens;
      const int64_t lp = i / p.tokens;
      const int64_t plane = lp % 2, layer = lp / 2;
      const int64_t slot = p.slots[t * p.slot_stride];
      if (slot < 0) continue;
      char* block = p.layers[layer] + (slot / p.block_size) * p.block_strides[layer] * p.elem;
      for (int64_t h = 0; h < p.heads; ++h) {
        const int64_t r = mapped_row(p.block_size, p.heads, p.head_dim, plane, slot % p.block_size, h);
        const int64_t* row = p.offsets + r;
        char* chunk = p.chunk + chunk_index(c, layer, plane, t, h) * p.elem;
        if (p.runs[static_cast<size_t>(r / p.head_dim)] && c.dim == 1) {
          char* cache = block + row[0] * p.elem;
          std::memcpy(kGather ? chunk : cache, kGather ? cache : chunk, static_cast<size_t>(p.head_dim * p.elem));
        } else {
          move_mapped_elems<kGather>(p.elem, block, row, chunk, c.dim, p.head_dim);
        }
      }
    }
  });
}

void paged_gather_mapped(at::TensorList kv_caches, const at::Tensor& slot_mapping, const at::Tensor& offsets,
                         const at::Tensor& out) {
  run_mapped<true>(make_mapped_plan(kv_caches, slot_mapping, offsets, out));
}

void paged_scatter_mapped(const at::Tensor& chunk, at::TensorList kv_caches, const at::Tensor& slot_mapping,
                          const at::Tensor& offsets) {
  run_mapped<false>(make_mapped_plan(kv_caches, slot_mapping, offsets, chunk));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmkv, m) {
  m.def("paged_gather(Tensor[] kv_caches, Tensor slot_mapping, Tensor(a!) out, int layout) -> ()");
  m.def("paged_scatter(Tensor chunk, Tensor(a!)[] kv_caches, Tensor slot_mapping, int layout) -> ()");
  m.def("paged_gather_mapped(Tensor[] kv_caches, Tensor slot_mapping, Tensor offsets, Tensor(a!) out) -> ()");
  m.def("paged_scatter_mapped(Tensor chunk, Tensor(a!)[] kv_caches, Tensor slot_mapping, Tensor offsets) -> ()");
}

TORCH_LIBRARY_IMPL(lmkv, CPU, m) {
  m.impl("paged_gather", &paged_gather);
  m.impl("paged_scatter", &paged_scatter);
  m.impl("paged_gather_mapped", &paged_gather_mapped);
  m.impl("paged_scatter_mapped", &paged_scatter_mapped);
}
