// torch.ops.lmkv.*_cuda: the launchers of csrc/cuda/*.cu bound into torch (the CUDA dispatch key).
//
// The only file of csrc/cuda that knows torch: it checks tensors (device, dtype, shape) before anything is
// launched, builds the small device tables the kernels read (layer pointers and views, in words), and launches on
// the CURRENT torch stream of the tensors' device, so a caller's `with torch.cuda.stream(s)` is honoured and no
// call synchronises except where a size must come back to the host (the encoder's payload length).
// Built with the .cu files by lmkv/optimized/cuda.py (torch.utils.cpp_extension.load); CI, which has no CUDA
// build of torch, compiles it (-c) against the CPU wheel's headers and the toolkit's, and checks that every
// launcher it calls is defined by a .cu file.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "lmkv/cuda_api.h"

namespace {

using lmkv::paged::ChunkView;
using lmkv::paged::CopyShape;
using lmkv::paged::LayerView;

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// int64 words on the host (pinned) -> the same words on `device`, copied on the current stream. The caching host
// allocator keeps the pinned block alive until that copy has run.
at::Tensor to_device(const std::vector<int64_t>& words, const at::Device& device) {
  auto host = at::empty({static_cast<int64_t>(words.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), words.data(), words.size() * sizeof(int64_t));
  return host.to(device, /*non_blocking=*/true);
}

// The chunk is on the caches' device, or in pinned host memory (which the kernels reach through unified addressing).
void check_chunk_place(const at::Tensor& chunk, const at::Device& device) {
  TORCH_CHECK((chunk.is_cuda() && chunk.device() == device) || (chunk.device().is_cpu() && chunk.is_pinned()),
              "chunk must be on ", device, " (the kv_caches' device) or in pinned host memory, got ", chunk.device(),
              chunk.device().is_cpu() ? " (not pinned)" : "");
}

void check_caches(at::TensorList caches, const at::Tensor& slots) {
  TORCH_CHECK(!caches.empty(), "kv_caches is empty");
  const at::Tensor& first = caches[0];
  TORCH_CHECK(first.is_cuda(), "kv_caches[0] must be a CUDA tensor, got ", first.device());
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& t = caches[i];
    TORCH_CHECK(t.device() == first.device(), "kv_caches[", i, "] is on ", t.device(), ", kv_caches[0] on ",
                first.device());
    TORCH_CHECK(t.sizes().equals(first.sizes()), "kv_caches[", i, "] shape differs from kv_caches[0]");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), "kv_caches[", i, "] dtype differs from kv_caches[0]");
  }
  TORCH_CHECK(slots.device() == first.device() && slots.scalar_type() == at::kLong && slots.dim() == 1,
              "slot_mapping must be a 1-D int64 tensor on ", first.device());
}

// ---- paged, named layouts -----------------------------------------------------------------------------------
void paged_copy(bool gather, at::TensorList caches, const at::Tensor& slots, const at::Tensor& chunk,
                int64_t layout64) {
  using namespace lmkv::paged;
  TORCH_CHECK(layout64 >= 0 && layout64 < kNumLayouts, "layout code must be in [0, 6), got ", layout64);
  const auto layout = static_cast<int32_t>(layout64);
  const bool mla = layout == kMla;
  check_caches(caches, slots);
  TORCH_CHECK(layout != kCrossLayer || caches.size() == 1, "cross_layer takes exactly one kv_caches tensor");
  const at::Tensor& first = caches[0];
  TORCH_CHECK(first.dim() == layout_ndim(layout), "kv_caches[0] has ", first.dim(), " dims, layout needs ",
              layout_ndim(layout));
  const Axes axes = layout_axes(layout);
  TORCH_CHECK(axes.plane < 0 || first.size(axes.plane) == 2, "kv_caches: the K/V axis must have size 2");
  const int64_t elem = first.element_size();
  CopyShape shape{};
  shape.num_layers = axes.layer >= 0 ? first.size(axes.layer) : static_cast<int64_t>(caches.size());
  shape.planes = mla ? 1 : 2;
  shape.tokens = slots.size(0);
  shape.heads = axes.head >= 0 ? first.size(axes.head) : 1;
  shape.block_size = first.size(axes.offset);
  shape.slot_stride = slots.stride(0);
  shape.capacity = first.size(axes.block) * shape.block_size;
  const int64_t head_dim = first.size(axes.dim);
  check_chunk_place(chunk, first.device());
  TORCH_CHECK(chunk.scalar_type() == first.scalar_type(), "chunk dtype differs from kv_caches");
  TORCH_CHECK(chunk.dim() == (mla ? 4 : 5), "chunk must be [L, 2, T, H, D] (MLA: [L, 1, T, D])");
  TORCH_CHECK(chunk.size(0) == shape.num_layers && chunk.size(1) == shape.planes && chunk.size(2) >= shape.tokens &&
                  (mla ? chunk.size(3) == head_dim : (chunk.size(3) == shape.heads && chunk.size(4) == head_dim)),
              "chunk shape ", chunk.sizes(), " does not fit the kv_caches and ", shape.tokens, " slots");
  if (shape.tokens == 0) return;
  std::vector<const char*> ptrs;
  std::vector<LayerView> views;
  for (int64_t l = 0; l < shape.num_layers; ++l) {
    const at::Tensor& t = caches[axes.layer >= 0 ? 0 : l];
    ptrs.push_back(static_cast<const char*>(t.data_ptr()));
    views.push_back(layer_view(layout, t.strides().data(), axes.layer >= 0 ? l : 0));
  }
  ChunkView cview = chunk_view(mla, chunk.strides().data());
  char* chunk_ptr = static_cast<char*>(chunk.data_ptr());
  const int32_t word = widest_word(views.data(), ptrs.data(), shape.num_layers, cview, chunk_ptr, head_dim, elem);
  shape.head_dim = head_dim * elem / word;
  cview = to_words(cview, elem, word);
  // One device table: [L] layer pointers, then [L] views of 6 int64 each (LayerView is six int64: no padding).
  static_assert(sizeof(LayerView) == 6 * sizeof(int64_t), "LayerView must be six int64");
  std::vector<int64_t> words(static_cast<size_t>(shape.num_layers * 7));
  for (int64_t l = 0; l < shape.num_layers; ++l) {
    words[l] = reinterpret_cast<int64_t>(ptrs[l]);
    const LayerView v = to_words(views[l], elem, word);
    std::memcpy(&words[shape.num_layers + 6 * l], &v, sizeof(LayerView));
  }
  const c10::cuda::CUDAGuard guard(first.device());
  const at::Tensor table = to_device(words, first.device());
  auto* dev_words = table.data_ptr<int64_t>();
  check_launch(lmkv_paged_copy_cuda(gather ? 1 : 0, reinterpret_cast<char* const*>(dev_words),
                                    reinterpret_cast<const LayerView*>(dev_words + shape.num_layers), chunk_ptr, cview,
                                    slots.data_ptr<int64_t>(), shape, word, stream_of(first)),
               gather ? "paged_gather_cuda" : "paged_scatter_cuda");
}

void paged_gather_cuda(at::TensorList kv_caches, const at::Tensor& slot_mapping, const at::Tensor& out,
                       int64_t layout) {
  paged_copy(true, kv_caches, slot_mapping, out, layout);
}

void paged_scatter_cuda(const at::Tensor& chunk, at::TensorList kv_caches, const at::Tensor& slot_mapping,
                        int64_t layout) {
  paged_copy(false, kv_caches, slot_mapping, chunk, layout);
}

// ---- paged, BlockMap layouts ---------------------------------------------------------------------------------
// `offsets` is the map's [2, BS, H, D] int64 table already on the device (the Python side keeps one copy per map);
// `span` its largest entry + 1, which every block must hold (checked here on the host: reading the table back
// would synchronise).
void paged_copy_mapped(bool gather, at::TensorList caches, const at::Tensor& slots, const at::Tensor& offsets,
                       int64_t span, const at::Tensor& chunk) {
  check_caches(caches, slots);
  const at::Tensor& first = caches[0];
  TORCH_CHECK(offsets.device() == first.device() && offsets.scalar_type() == at::kLong && offsets.dim() == 4 &&
                  offsets.size(0) == 2 && offsets.is_contiguous(),
              "offsets must be a contiguous int64 [2, BS, H, D] tensor on ", first.device());
  TORCH_CHECK(first.dim() >= 2, "kv_caches[0] must be [NB, ...] with the blocks first");
  CopyShape shape{};
  shape.num_layers = static_cast<int64_t>(caches.size());
  shape.planes = 2;
  shape.tokens = slots.size(0);
  shape.block_size = offsets.size(1);
  shape.heads = offsets.size(2);
  shape.head_dim = offsets.size(3);
  shape.slot_stride = slots.stride(0);
  shape.capacity = first.size(0) * shape.block_size;
  std::vector<int64_t> words(static_cast<size_t>(2 * shape.num_layers));
  for (int64_t l = 0; l < shape.num_layers; ++l) {
    const at::Tensor& t = caches[l];
    TORCH_CHECK(t[0].is_contiguous() && t[0].numel() >= span, "kv_caches[", l, "] blocks must be contiguous runs "
                "of at least ", span, " elements");
    words[l] = reinterpret_cast<int64_t>(t.data_ptr());
    words[shape.num_layers + l] = t.stride(0);
  }
  check_chunk_place(chunk, first.device());
  TORCH_CHECK(chunk.scalar_type() == first.scalar_type() && chunk.dim() == 5 && chunk.size(0) == shape.num_layers &&
                  chunk.size(1) == 2 && chunk.size(2) >= shape.tokens && chunk.size(3) == shape.heads &&
                  chunk.size(4) == shape.head_dim,
              "chunk shape ", chunk.sizes(), " does not fit the kv_caches, the offsets and ", shape.tokens, " slots");
  if (shape.tokens == 0) return;
  const c10::cuda::CUDAGuard guard(first.device());
  const at::Tensor table = to_device(words, first.device());
  auto* dev_words = table.data_ptr<int64_t>();
  check_launch(lmkv_paged_copy_mapped_cuda(gather ? 1 : 0, reinterpret_cast<char* const*>(dev_words),
                                           dev_words + shape.num_layers, offsets.data_ptr<int64_t>(),
                                           static_cast<char*>(chunk.data_ptr()),
                                           lmkv::paged::chunk_view(false, chunk.strides().data()),
                                           slots.data_ptr<int64_t>(), shape,
                                           static_cast<int>(first.element_size()), stream_of(first)),
               gather ? "paged_gather_mapped_cuda" : "paged_scatter_mapped_cuda");
}

void paged_gather_mapped_cuda(at::TensorList kv_caches, const at::Tensor& slot_mapping, const at::Tensor& offsets,
                              int64_t span, const at::Tensor& out) {
  paged_copy_mapped(true, kv_caches, slot_mapping, offsets, span, out);
}

void paged_scatter_mapped_cuda(const at::Tensor& chunk, at::TensorList kv_caches, const at::Tensor& slot_mapping,
                               const at::Tensor& offsets, int64_t span) {
  paged_copy_mapped(false, kv_caches, slot_mapping, offsets, span, chunk);
}

// ---- codec ---------------------------------------------------------------------------------------------------
void check_coder_tables(const at::Tensor& cdf, int64_t streams) {
  TORCH_CHECK(cdf.is_cuda() && cdf.scalar_type() == at::kInt && cdf.dim() == 2, "cdf must be int32 [S, n + 1] on CUDA");
  TORCH_CHECK(cdf.size(0) == streams, "cdf rows (", cdf.size(0), ") must match the ", streams, " streams");
  TORCH_CHECK(cdf.size(1) >= 2 && cdf.size(1) <= 257, "cdf: the alphabet must have 1..256 symbols");
}

// symbols uint8 [S, T], cdf int32 [S, n + 1] (both on one CUDA device) -> (payload uint8 [N], lengths int64 [S]),
// on that device. Synchronises once: the payload's size comes back to the host.
std::tuple<at::Tensor, at::Tensor> codec_ac_encode_cuda(const at::Tensor& symbols_in, const at::Tensor& cdf_in) {
  TORCH_CHECK(symbols_in.is_cuda() && symbols_in.scalar_type() == at::kByte && symbols_in.dim() == 2,
              "symbols must be uint8 [S, T] on CUDA");
  TORCH_CHECK(cdf_in.device() == symbols_in.device(), "cdf must be on the symbols' device ", symbols_in.device());
  check_coder_tables(cdf_in, symbols_in.size(0));
  const c10::cuda::CUDAGuard guard(symbols_in.device());
  const at::Tensor symbols = symbols_in.contiguous();
  const at::Tensor cdf = cdf_in.contiguous();
  const int64_t S = symbols.size(0), T = symbols.size(1);
  const auto opts = symbols.options();
  at::Tensor lengths = at::empty({S}, opts.dtype(at::kLong));
  at::Tensor offsets = at::zeros({S + 1}, opts.dtype(at::kLong));
  if (S == 0 || T == 0) {
    lengths.zero_();
    return {at::empty({0}, opts), lengths};
  }
  at::Tensor scratch = at::empty({static_cast<int64_t>(lmkv_codec_scratch_bytes(S, T))}, opts);
  const cudaStream_t stream = stream_of(symbols);
  check_launch(lmkv_codec_encode_cuda(symbols.data_ptr<uint8_t>(), S, T, T, 1, cdf.data_ptr<int32_t>(),
                                      static_cast<int>(cdf.size(1)), scratch.data_ptr<uint8_t>(),
                                      lengths.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), stream),
               "codec_ac_encode_cuda");
  TORCH_CHECK(!(lengths < 0).any().item<bool>(), "codec_ac_encode_cuda: a stream overflowed its slot (bad cdf)");
  const int64_t total = offsets[S].item<int64_t>();
  at::Tensor out = at::empty({total}, opts);
  check_launch(lmkv_codec_compact_cuda(scratch.data_ptr<uint8_t>(), S, T, offsets.data_ptr<int64_t>(),
                                       out.data_ptr<uint8_t>(), stream),
               "codec_ac_encode_cuda (compact)");
  return {out, lengths};
}

// data uint8 [N], offsets int64 [S + 1] (stream s = data[offsets[s], offsets[s + 1])), cdf int32 [S, n + 1], all
// on one CUDA device -> symbols uint8 [S, num_tokens] there. The offsets were checked on the host by the caller
// (lmkv.ops.codec: they sum to N); a forged stream decodes to garbage symbols, never out of its bytes.
at::Tensor codec_ac_decode_cuda(const at::Tensor& data_in, const at::Tensor& offsets_in, const at::Tensor& cdf_in,
                                int64_t num_tokens) {
  TORCH_CHECK(data_in.is_cuda() && data_in.scalar_type() == at::kByte && data_in.dim() == 1,
              "data must be uint8 [N] on CUDA");
  TORCH_CHECK(offsets_in.device() == data_in.device() && offsets_in.scalar_type() == at::kLong &&
                  offsets_in.dim() == 1 && offsets_in.size(0) >= 1,
              "offsets must be int64 [S + 1] on ", data_in.device());
  TORCH_CHECK(cdf_in.device() == data_in.device(), "cdf must be on the data's device ", data_in.device());
  TORCH_CHECK(num_tokens >= 0, "num_tokens must be >= 0");
  const int64_t S = offsets_in.size(0) - 1;
  check_coder_tables(cdf_in, S);
  const c10::cuda::CUDAGuard guard(data_in.device());
  const at::Tensor data = data_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor cdf = cdf_in.contiguous();
  at::Tensor symbols = at::empty({S, num_tokens}, data.options());
  if (S == 0 || num_tokens == 0) return symbols;
  check_launch(lmkv_codec_decode_cuda(data.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(), S, num_tokens,
                                      cdf.data_ptr<int32_t>(), static_cast<int>(cdf.size(1)),
                                      symbols.data_ptr<uint8_t>(), num_tokens, 1, stream_of(data)),
               "codec_ac_decode_cuda");
  return symbols;
}

// ---- blend ---------------------------------------------------------------------------------------------------
// keys [..., T, H, D] fp32/fp16/bf16, delta int64 [T], inv_freq fp32 [R/2], all on one CUDA device -> the keys
// rotated by delta (a new contiguous tensor; dims past rotary_dim are copied).
at::Tensor blend_rerotate_cuda(const at::Tensor& keys, const at::Tensor& delta_in, const at::Tensor& inv_freq_in,
                               int64_t rotary_dim) {
  TORCH_CHECK(keys.is_cuda() && keys.dim() >= 3, "keys must be [..., T, H, D] on CUDA");
  TORCH_CHECK(delta_in.device() == keys.device() && delta_in.scalar_type() == at::kLong && delta_in.dim() == 1,
              "delta must be int64 [T] on ", keys.device());
  TORCH_CHECK(inv_freq_in.device() == keys.device() && inv_freq_in.scalar_type() == at::kFloat &&
                  inv_freq_in.dim() == 1,
              "inv_freq must be fp32 [R/2] on ", keys.device());
  const int64_t D = keys.size(-1), H = keys.size(-2), T = keys.size(-3);
  TORCH_CHECK(delta_in.size(0) == T, "delta length must equal T (keys dim -3)");
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= D, "rotary_dim must be even, in (0, D]");
  TORCH_CHECK(inv_freq_in.size(0) == rotary_dim / 2, "inv_freq must have rotary_dim / 2 entries");
  const c10::cuda::CUDAGuard guard(keys.device());
  const at::Tensor in = keys.contiguous();
  const at::Tensor delta = delta_in.contiguous();
  const at::Tensor inv_freq = inv_freq_in.contiguous();
  at::Tensor out = at::empty_like(in);
  const int64_t rows = in.numel() / D;
  if (rows == 0) return out;
  const cudaStream_t stream = stream_of(in);
  const int64_t* dp = delta.data_ptr<int64_t>();
  const float* fp = inv_freq.data_ptr<float>();
  cudaError_t err;
  switch (in.scalar_type()) {
    case at::kFloat:
      err = lmkv_blend_rerotate_f32(in.data_ptr<float>(), out.data_ptr<float>(), dp, fp, rows, T, H, D, rotary_dim,
                                    stream);
      break;
    case at::kHalf:
      err = lmkv_blend_rerotate_f16(static_cast<const uint16_t*>(in.data_ptr()), static_cast<uint16_t*>(out.data_ptr()),
                                    dp, fp, rows, T, H, D, rotary_dim, stream);
      break;
    case at::kBFloat16:
      err = lmkv_blend_rerotate_bf16(static_cast<const uint16_t*>(in.data_ptr()),
                                     static_cast<uint16_t*>(out.data_ptr()), dp, fp, rows, T, H, D, rotary_dim, stream);
      break;
    default:
      TORCH_CHECK(false, "keys must be float32, float16 or bfloat16, got ", in.scalar_type());
  }
  check_launch(err, "blend_rerotate_cuda");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmkv, m) {
  m.def("paged_gather_cuda(Tensor[] kv_caches, Tensor slot_mapping, Tensor(a!) out, int layout) -> ()");
  m.def("paged_scatter_cuda(Tensor chunk, Tensor(a!)[] kv_caches, Tensor slot_mapping, int layout) -> ()");
  m.def("paged_gather_mapped_cuda(Tensor[] kv_caches, Tensor slot_mapping, Tensor offsets, int span, "
        "Tensor(a!) out) -> ()");
  m.def("paged_scatter_mapped_cuda(Tensor chunk, Tensor(a!)[] kv_caches, Tensor slot_mapping, Tensor offsets, "
        "int span) -> ()");
  m.def("codec_ac_encode_cuda(Tensor symbols, Tensor cdf) -> (Tensor, Tensor)");
  m.def("codec_ac_decode_cuda(Tensor data, Tensor offsets, Tensor cdf, int num_tokens) -> Tensor");
  m.def("blend_rerotate_cuda(Tensor keys, Tensor delta, Tensor inv_freq, int rotary_dim) -> Tensor");
}

// A pinned host chunk beside CUDA caches still dispatches here: CUDA outranks CPU among the arguments' keys.
TORCH_LIBRARY_IMPL(lmkv, CUDA, m) {
  m.impl("paged_gather_cuda", &paged_gather_cuda);
  m.impl("paged_scatter_cuda", &paged_scatter_cuda);
  m.impl("paged_gather_mapped_cuda", &paged_gather_mapped_cuda);
  m.impl("paged_scatter_mapped_cuda", &paged_scatter_mapped_cuda);
  m.impl("codec_ac_encode_cuda", &codec_ac_encode_cuda);
  m.impl("codec_ac_decode_cuda", &codec_ac_decode_cuda);
  m.impl("blend_rerotate_cuda", &blend_rerotate_cuda);
}
