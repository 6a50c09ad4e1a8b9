// lmkv chunk hashing on CUDA: one thread per leaf (BLAKE2s-128 of a chunk), then one thread per sequence
// for the chain. Torch-free: launchers take raw device pointers and a cudaStream_t.
//
// Limits: compile-checked only in CI (no GPU here; nothing in Python calls these yet). Tokens are uint32 ids
// (the caller has range-checked them); digests match reference/hashing.py through the shared core in
// csrc/include/lmkv/hash_blake2s.h. One thread per leaf is memory-friendly enough for prompt-sized work;
// a warp-per-leaf variant would be the next step for very long chunks.
#include <cuda_runtime.h>

#include <cstdint>

#include "lmkv/cuda_api.h"
#include "lmkv/hash_blake2s.h"

namespace {

using namespace lmkv::b2s;

// Leaf j of sequence s covers tokens[seq_start[s] + i*C, ...) where (s, i) = leaf_seq[j], leaf_idx[j].
__global__ void leaf_kernel(const uint32_t* __restrict__ tokens, const int64_t* __restrict__ leaf_start,
                            const int64_t* __restrict__ leaf_len, int64_t num_leaves, uint32_t* __restrict__ leaves) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= num_leaves) return;
  hash_words(tokens + leaf_start[j], leaf_len[j], kLeaf, leaves + 4 * j);
}

// Sequence s owns leaves [first[s], first[s+1]); keys are chained from root.
__global__ void chain_kernel(const uint32_t* __restrict__ leaves, const int64_t* __restrict__ first, int64_t num_seqs,
                             const uint8_t* __restrict__ root, uint8_t* __restrict__ keys) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= num_seqs) return;
  uint32_t key[4];
  load_digest(root, key);
  for (int64_t i = first[s]; i < first[s + 1]; ++i) {
    hash_pair(key, leaves + 4 * i, kChain, key);
    store_digest(key, keys + 16 * i);
  }
}

}  // namespace

// Leaves for every (start, len) job, then per-sequence chains. `leaves_scratch` holds 4 words per leaf.
extern "C" cudaError_t lmkv_hashing_chunk_keys_cuda(const uint32_t* tokens, const int64_t* leaf_start,
                                                    const int64_t* leaf_len, int64_t num_leaves, const int64_t* first,
                                                    int64_t num_seqs, const uint8_t* root, uint32_t* leaves_scratch,
                                                    uint8_t* keys, cudaStream_t stream) {
  if (num_leaves == 0) return cudaSuccess;
  const int threads = 128;
  const int64_t leaf_blocks = (num_leaves + threads - 1) / threads;
  leaf_kernel<<<static_cast<unsigned>(leaf_blocks), threads, 0, stream>>>(tokens, leaf_start, leaf_len, num_leaves,
                                                                           leaves_scratch);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t seq_blocks = (num_seqs + threads - 1) / threads;
  chain_kernel<<<static_cast<unsigned>(seq_blocks), threads, 0, stream>>>(leaves_scratch, first, num_seqs, root, keys);
  return cudaGetLastError();
}
