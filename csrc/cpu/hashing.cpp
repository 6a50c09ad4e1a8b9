// lmkv chunk hashing on CPU: BLAKE2s-128 leaves eight at a time in SIMD lanes, chained per sequence.
//
// Limits: CPU tensors only; tokens are a 1-D contiguous int32 (read as uint32 bit patterns) or int64
// (values already checked to lie in [0, 2**32) by lmkv.ops.hashing) tensor. Full chunks are hashed eight
// per vector (GCC/Clang vector extensions: one AVX2 register on x86, scalar code elsewhere), partial
// chunks and segments one at a time; leaves may run on OpenMP threads (num_threads, default 1 from Python:
// see pick_threads), each chain is sequential.
// Digests are identical to reference/hashing.py (tests/test_hashing.py proves it).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "lmkv/hash_blake2s.h"
#include "lmkv/hash_blake2s_simd.h"

namespace {

using namespace lmkv::b2s;

void check_tokens(const at::Tensor& tokens, at::ScalarType dtype) {
  TORCH_CHECK(tokens.device().is_cpu(), "tokens must be CPU tensors");
  TORCH_CHECK(tokens.dim() == 1 && tokens.is_contiguous(), "tokens must be 1-D contiguous");
  TORCH_CHECK(tokens.scalar_type() == at::kInt || tokens.scalar_type() == at::kLong, "tokens must be int32 or int64");
  TORCH_CHECK(tokens.scalar_type() == dtype, "all token tensors must share one dtype");
}

void load_root(const at::Tensor& root, uint32_t r[4]) {
  TORCH_CHECK(root.scalar_type() == at::kByte && root.numel() == 16 && root.is_contiguous(), "root must be 16 bytes");
  load_digest(root.data_ptr<uint8_t>(), r);
}

constexpr int64_t kParallelTokens = 1 << 15;

// Threads: fork-join only pays above kParallelTokens, and on an oversubscribed machine a descheduled worker
// stalls the whole call for a time slice (~16 ms measured), so the caller chooses; <= 0 means OpenMP's default.
int pick_threads(int64_t requested, int64_t tokens) {
  if (tokens < kParallelTokens) return 1;
  if (requested <= 0) return omp_get_max_threads();
  return static_cast<int>(requested);
}

template <typename T>
const T* token_ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

template <typename T>
void chunk_keys_impl(const std::vector<at::Tensor>& seqs, int64_t chunk_size, bool include_partial,
                     const uint32_t r[4], uint8_t* o, const std::vector<int64_t>& first, int threads) {
  const int64_t nseq = static_cast<int64_t>(seqs.size());
  const int64_t total = first[nseq];
  std::vector<const T*> full_ptr;
  std::vector<int64_t> full_slot, part_len, part_slot;
  std::vector<const T*> part_ptr;
  for (int64_t s = 0; s < nseq; ++s) {
    const T* base = token_ptr<T>(seqs[s]);
    const int64_t n = seqs[s].numel();
    for (int64_t i = 0; i < first[s + 1] - first[s]; ++i) {
      const int64_t len = std::min(chunk_size, n - i * chunk_size);
      if (len == chunk_size) {
        full_ptr.push_back(base + i * chunk_size);
        full_slot.push_back(first[s] + i);
      } else {
        part_ptr.push_back(base + i * chunk_size);
        part_len.push_back(len);
        part_slot.push_back(first[s] + i);
      }
    }
  }
  std::vector<uint32_t> leaf_buf(static_cast<size_t>(total) * 4);
  auto* leaf = reinterpret_cast<uint32_t(*)[4]>(leaf_buf.data());
  const int64_t groups = static_cast<int64_t>(full_ptr.size()) / W;
  const int64_t rest = static_cast<int64_t>(full_ptr.size()) - groups * W;
  const int64_t jobs = groups + rest + static_cast<int64_t>(part_ptr.size());
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t g = 0; g < jobs; ++g) {
    if (g < groups) {
      uint32_t out[W][4];
      leaf_lanes(full_ptr.data() + g * W, chunk_size, out);
      for (int l = 0; l < W; ++l) std::memcpy(leaf[full_slot[g * W + l]], out[l], 16);
    } else if (g < groups + rest) {
      const int64_t k = groups * W + (g - groups);
      hash_words(full_ptr[k], chunk_size, kLeaf, leaf[full_slot[k]]);
    } else {
      const int64_t k = g - groups - rest;
      hash_words(part_ptr[k], part_len[k], kLeaf, leaf[part_slot[k]]);
    }
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && nseq > 1)
  for (int64_t s = 0; s < nseq; ++s) {
    uint32_t key[4] = {r[0], r[1], r[2], r[3]};
    for (int64_t i = first[s]; i < first[s + 1]; ++i) {
      hash_pair(key, leaf[i], kChain, key);
      store_digest(key, o + 16 * i);
    }
  }
}

// Keys of every sequence, concatenated in order: uint8 [sum of chunk counts, 16].
at::Tensor chunk_keys(const std::vector<at::Tensor>& seqs, int64_t chunk_size, bool include_partial,
                      const at::Tensor& root, int64_t num_threads) {
  TORCH_CHECK(chunk_size > 0, "chunk_size must be positive");
  uint32_t r[4];
  load_root(root, r);
  const int64_t nseq = static_cast<int64_t>(seqs.size());
  std::vector<int64_t> first(nseq + 1, 0);
  int64_t tokens = 0;
  for (int64_t s = 0; s < nseq; ++s) {
    check_tokens(seqs[s], seqs[0].scalar_type());
    first[s + 1] = first[s] + num_chunks(seqs[s].numel(), chunk_size, include_partial);
    tokens += seqs[s].numel();
  }
  at::Tensor out = at::empty({first[nseq], 16}, at::kByte);
  if (first[nseq] == 0) return out;
  const int threads = pick_threads(num_threads, tokens);
  if (seqs[0].scalar_type() == at::kInt) {
    chunk_keys_impl<uint32_t>(seqs, chunk_size, include_partial, r, out.data_ptr<uint8_t>(), first, threads);
  } else {
    chunk_keys_impl<int64_t>(seqs, chunk_size, include_partial, r, out.data_ptr<uint8_t>(), first, threads);
  }
  return out;
}

// Position-free keys B(root || leaf(tokens[starts[i] .. ends[i])), SEG): uint8 [n, 16].
at::Tensor segment_keys(const at::Tensor& tokens, const at::Tensor& starts, const at::Tensor& ends,
                        const at::Tensor& root, int64_t num_threads) {
  check_tokens(tokens, tokens.scalar_type());
  TORCH_CHECK(starts.scalar_type() == at::kLong && ends.scalar_type() == at::kLong && starts.numel() == ends.numel() &&
                  starts.is_contiguous() && ends.is_contiguous(), "starts/ends must be int64 of equal length");
  uint32_t r[4];
  load_root(root, r);
  const int64_t n = starts.numel();
  const int64_t* s = starts.data_ptr<int64_t>();
  const int64_t* e = ends.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(0 <= s[i] && s[i] <= e[i] && e[i] <= tokens.numel(), "bad segment");
  at::Tensor out = at::empty({n, 16}, at::kByte);
  uint8_t* o = out.data_ptr<uint8_t>();
  const bool is_int = tokens.scalar_type() == at::kInt;
  const uint32_t* t32 = is_int ? reinterpret_cast<const uint32_t*>(tokens.data_ptr<int32_t>()) : nullptr;
  const int64_t* t64 = is_int ? nullptr : tokens.data_ptr<int64_t>();
  const int threads = pick_threads(num_threads, tokens.numel());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t lf[4], key[4];
    if (is_int) hash_words(t32 + s[i], e[i] - s[i], kLeaf, lf);
    else hash_words(t64 + s[i], e[i] - s[i], kLeaf, lf);
    hash_pair(r, lf, kSeg, key);
    store_digest(key, o + 16 * i);
  }
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
