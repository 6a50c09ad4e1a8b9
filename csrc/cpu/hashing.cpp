// lmkv chunk hashing on CPU as torch operators (torch.ops.lmkv.hashing_*): thin adapters over the torch-free
// core in csrc/include/lmkv/hash_chunks.h. The Python wrappers use the lower-overhead entry points of
// hashing_py.cpp instead; these ops remain for TorchScript/compiled callers and as a second, independent
// adapter that the tests compare.
//
// Limits: CPU tensors only; tokens are 1-D contiguous int32 (read as uint32 bit patterns) or int64 tensors
// whose values the caller has checked to lie in [0, 2**32). Digests are identical to reference/hashing.py.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

#include "lmkv/hash_chunks.h"

namespace {

using namespace lmkv::b2s;

Span span_of(const at::Tensor& tokens) {
  TORCH_CHECK(tokens.device().is_cpu(), "tokens must be CPU tensors");
  TORCH_CHECK(tokens.dim() == 1 && tokens.is_contiguous(), "tokens must be 1-D contiguous");
  TORCH_CHECK(tokens.scalar_type() == at::kInt || tokens.scalar_type() == at::kLong, "tokens must be int32 or int64");
  return {tokens.data_ptr(), tokens.numel(), tokens.scalar_type() == at::kLong};
}

void load_root(const at::Tensor& root, uint32_t r[4]) {
  TORCH_CHECK(root.scalar_type() == at::kByte && root.numel() == 16 && root.is_contiguous(), "root must be 16 bytes");
  load_digest(root.data_ptr<uint8_t>(), r);
}

// Keys of every sequence, concatenated in order: uint8 [sum of chunk counts, 16].
at::Tensor chunk_keys(const std::vector<at::Tensor>& seqs, int64_t chunk_size, bool include_partial,
                      const at::Tensor& root, int64_t num_threads) {
  TORCH_CHECK(chunk_size > 0, "chunk_size must be positive");
  uint32_t r[4];
  load_root(root, r);
  const int64_t nseq = static_cast<int64_t>(seqs.size());
  std::vector<Span> spans;
  std::vector<int64_t> first(nseq + 1, 0);
  int64_t tokens = 0;
  for (int64_t s = 0; s < nseq; ++s) {
    spans.push_back(span_of(seqs[s]));
    first[s + 1] = first[s] + num_chunks(spans[s].n, chunk_size, include_partial);
    tokens += spans[s].n;
  }
  at::Tensor out = at::empty({first[nseq], 16}, at::kByte);
  chunk_keys_spans(spans.data(), nseq, chunk_size, include_partial, r, first.data(), out.data_ptr<uint8_t>(),
                   pick_threads(num_threads, tokens));
  return out;
}

// Position-free keys B(root || leaf(tokens[starts[i] .. ends[i])), SEG): uint8 [n, 16].
at::Tensor segment_keys(const at::Tensor& tokens, const at::Tensor& starts, const at::Tensor& ends,
                        const at::Tensor& root, int64_t num_threads) {
  const Span sp = span_of(tokens);
  TORCH_CHECK(starts.scalar_type() == at::kLong && ends.scalar_type() == at::kLong && starts.numel() == ends.numel() &&
                  starts.is_contiguous() && ends.is_contiguous(), "starts/ends must be int64 of equal length");
  uint32_t r[4];
  load_root(root, r);
  const int64_t n = starts.numel();
  const int64_t* s = starts.data_ptr<int64_t>();
  const int64_t* e = ends.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(0 <= s[i] && s[i] <= e[i] && e[i] <= sp.n, "bad segment");
  at::Tensor out = at::empty({n, 16}, at::kByte);
  segment_keys_span(sp, s, e, n, r, out.data_ptr<uint8_t>(), pick_threads(num_threads, sp.n));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmkv, m) {
  m.def("hashing_chunk_keys(Tensor[] seqs, int chunk_size, bool include_partial, Tensor root, int num_threads) -> Tensor");
  m.def("hashing_segment_keys(Tensor tokens, Tensor starts, Tensor ends, Tensor root, int num_threads) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmkv, CPU, m) {
  m.impl("hashing_chunk_keys", &chunk_keys);
  m.impl("hashing_segment_keys", &segment_keys);
}
