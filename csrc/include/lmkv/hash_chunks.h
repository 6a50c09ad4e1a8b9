// Prefix-chained chunk keys and segment keys over raw token spans (CPU, torch-free): the one implementation
// behind both entry points of csrc/cpu/hashing*.cpp (the torch ops and the direct Python-C fast path).
//
// Limits: CPU only. A span is a contiguous run of uint32 (int32 bit patterns) or 64-bit token words whose
// values the caller has checked to lie in [0, 2**32). Full chunks are hashed W (8) per SIMD vector, grouped
// across sequences of the same word width (leftovers in one padded group); partial chunks one at a time.
// Leaves may run on OpenMP threads (threads > 1 and at least kParallelTokens tokens), every chain is
// sequential. Digests: reference/hashing.py.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lmkv/hash_blake2s.h"
#include "lmkv/hash_blake2s_simd.h"

namespace lmkv {
namespace b2s {

struct Span {
  const void* ptr;  // uint32_t* (wide == false) or uint64_t* (wide == true)
  int64_t n;
  bool wide;
};

constexpr int64_t kParallelTokens = 1 << 15;

// Fork-join only pays above kParallelTokens, and on an oversubscribed machine a descheduled worker stalls the
// whole call for a time slice (~16 ms measured), so the caller chooses; <= 0 means OpenMP's default.
inline int pick_threads(int64_t requested, int64_t tokens) {
  if (tokens < kParallelTokens) return 1;
  if (requested <= 0) return omp_get_max_threads();
  return static_cast<int>(requested);
}

namespace detail {

template <typename T>
struct FullJobs {
  std::vector<const T*> ptr;
  std::vector<int64_t> slot;
  int64_t groups() const { return static_cast<int64_t>(ptr.size()) / W; }
  int64_t rest() const { return static_cast<int64_t>(ptr.size()) - groups() * W; }
  // Leftover leaves share one padded SIMD group (about the cost of two scalar leaves) unless there is one.
  int64_t jobs() const { return groups() + (rest() >= 2 ? 1 : rest()); }
};

template <typename T>
inline void run_full(const FullJobs<T>& jobs, int64_t g, int64_t chunk_size, uint32_t (*leaf)[4]) {
  const int64_t groups = jobs.groups();
  const int64_t rest = jobs.rest();
  uint32_t out[W][4];
  if (g < groups) {
    leaf_lanes(jobs.ptr.data() + g * W, chunk_size, out);
    for (int l = 0; l < W; ++l) std::memcpy(leaf[jobs.slot[g * W + l]], out[l], 16);
  } else if (rest >= 2) {  // the padded group: unused lanes repeat the first leftover leaf, their output dropped
    const T* lanes[W];
    for (int l = 0; l < W; ++l) lanes[l] = jobs.ptr[groups * W + (l < rest ? l : 0)];
    leaf_lanes(lanes, chunk_size, out);
    for (int64_t l = 0; l < rest; ++l) std::memcpy(leaf[jobs.slot[groups * W + l]], out[l], 16);
  } else {
    hash_words(jobs.ptr[groups * W], chunk_size, kLeaf, leaf[jobs.slot[groups * W]]);
  }
}

}  // namespace detail

// Keys of every span, concatenated in order into out (16 bytes each); first[s] is span s's first key index
// (first has nseq + 1 entries, first[nseq] keys in all).
inline void chunk_keys_spans(const Span* seqs, int64_t nseq, int64_t chunk_size, bool include_partial,
                             const uint32_t r[4], const int64_t* first, uint8_t* out, int threads) {
  const int64_t total = first[nseq];
  if (total == 0) return;
  detail::FullJobs<uint32_t> f32;
  detail::FullJobs<uint64_t> f64;
  struct Part {
    const void* ptr;
    int64_t len, slot;
    bool wide;
  };
  std::vector<Part> parts;
  for (int64_t s = 0; s < nseq; ++s) {
    const Span& sp = seqs[s];
    const int64_t full = sp.n / chunk_size;
    const int64_t keys = first[s + 1] - first[s];
    for (int64_t i = 0; i < std::min(full, keys); ++i) {
      if (sp.wide) {
        f64.ptr.push_back(static_cast<const uint64_t*>(sp.ptr) + i * chunk_size);
        f64.slot.push_back(first[s] + i);
      } else {
        f32.ptr.push_back(static_cast<const uint32_t*>(sp.ptr) + i * chunk_size);
        f32.slot.push_back(first[s] + i);
      }
    }
    if (keys > full) {
      const int64_t off = full * chunk_size;
      const void* p = sp.wide ? static_cast<const void*>(static_cast<const uint64_t*>(sp.ptr) + off)
                              : static_cast<const void*>(static_cast<const uint32_t*>(sp.ptr) + off);
      parts.push_back({p, sp.n - off, first[s] + full, sp.wide});
    }
  }
  std::vector<uint32_t> leaf_buf(static_cast<size_t>(total) * 4);
  auto* leaf = reinterpret_cast<uint32_t(*)[4]>(leaf_buf.data());
  const int64_t j32 = f32.jobs();
  const int64_t j64 = f64.jobs();
  const int64_t jobs = j32 + j64 + static_cast<int64_t>(parts.size());
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t g = 0; g < jobs; ++g) {
    if (g < j32) {
      detail::run_full(f32, g, chunk_size, leaf);
    } else if (g < j32 + j64) {
      detail::run_full(f64, g - j32, chunk_size, leaf);
    } else {
      const Part& p = parts[g - j32 - j64];
      if (p.wide) hash_words(static_cast<const uint64_t*>(p.ptr), p.len, kLeaf, leaf[p.slot]);
      else hash_words(static_cast<const uint32_t*>(p.ptr), p.len, kLeaf, leaf[p.slot]);
    }
  }
  // The chain: one 64-byte compression per key, sequential within a sequence.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && nseq > 1)
  for (int64_t s = 0; s < nseq; ++s) {
    uint32_t key[4] = {r[0], r[1], r[2], r[3]};
    for (int64_t i = first[s]; i < first[s + 1]; ++i) {
      hash_pair(key, leaf[i], kChain, key);
      store_digest(key, out + 16 * i);
    }
  }
}

// Position-free keys B(root || leaf(tokens[starts[i] .. ends[i])), SEG) into out (16 bytes each); the caller
// has checked 0 <= starts[i] <= ends[i] <= the span's length.
inline void segment_keys_span(const Span& tokens, const int64_t* starts, const int64_t* ends, int64_t n,
                              const uint32_t r[4], uint8_t* out, int threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t lf[4], key[4];
    if (tokens.wide) hash_words(static_cast<const uint64_t*>(tokens.ptr) + starts[i], ends[i] - starts[i], kLeaf, lf);
    else hash_words(static_cast<const uint32_t*>(tokens.ptr) + starts[i], ends[i] - starts[i], kLeaf, lf);
    hash_pair(r, lf, kSeg, key);
    store_digest(key, out + 16 * i);
  }
}

}  // namespace b2s
}  // namespace lmkv
