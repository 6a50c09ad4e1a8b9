// BLAKE2s-128 over uint32 token words: the torch-free core shared by csrc/cpu/hashing.cpp and
// csrc/cuda/hashing.cu. Spec: reference/hashing.py (lmkv format version 1).
//
// Limits: inputs are whole 32-bit words (token ids), so a message word is a token value and no byte
// order question arises; keys and salts are not used (BLAKE2s params: digest 16, fanout 1, depth 1), the
// 8-byte personalisation selects the domain. Digests are kept as 4 little-endian words until written out.
#pragma once

#include <cstdint>

#include "lmkv/common.h"

// Fully unrolled rounds let the compiler fold the message schedule (sigma) into register names.
#if defined(__CUDACC__) || defined(__HIPCC__) || defined(__clang__)
#define LMKV_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define LMKV_UNROLL _Pragma("GCC unroll 16")
#else
#define LMKV_UNROLL
#endif

namespace lmkv {
namespace b2s {

// "lmkvLEAF" etc. as two little-endian words each.
enum Domain : int { kRoot = 0, kLeaf = 1, kChain = 2, kSeg = 3 };

LMKV_HD uint32_t iv(int i) {
  const uint32_t v[8] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                         0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u};
  return v[i];
}

LMKV_HD uint32_t sigma(int round, int i) {
  const uint8_t s[10][16] = {
      {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
      {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
      {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
      {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
      {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0}};
  return s[round][i];
}

// Personalisation words: "lmkvROOT", "lmkvLEAF", "lmkvCHAN", "lmkvSEGM" read as little-endian uint32 pairs.
LMKV_HD uint32_t person_word(int domain, int half) {
  const uint32_t p[4][2] = {{0x766B6D6Cu, 0x544F4F52u},   // lmkv ROOT
                            {0x766B6D6Cu, 0x4641454Cu},   // lmkv LEAF
                            {0x766B6D6Cu, 0x4E414843u},   // lmkv CHAN
                            {0x766B6D6Cu, 0x4D474553u}};  // lmkv SEGM
  return p[domain][half];
}

// Initial chaining value for digest_size 16, no key, fanout 1, depth 1, personalisation of `domain`.
LMKV_HD void init(uint32_t h[8], int domain) {
  for (int i = 0; i < 8; ++i) h[i] = iv(i);
  h[0] ^= 0x01010000u ^ 16u;
  h[6] ^= person_word(domain, 0);
  h[7] ^= person_word(domain, 1);
}

LMKV_HD uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

#define LMKV_B2S_G(a, b, c, d, x, y)  \
  do {                                \
    a = a + b + (x);                  \
    d = rotr(d ^ a, 16);              \
    c = c + d;                        \
    b = rotr(b ^ c, 12);              \
    a = a + b + (y);                  \
    d = rotr(d ^ a, 8);               \
    c = c + d;                        \
    b = rotr(b ^ c, 7);               \
  } while (0)

// One compression: `t` is the byte count including this block, `last` marks the final block.
LMKV_HD void compress(uint32_t h[8], const uint32_t m[16], uint64_t t, bool last) {
  uint32_t v[16];
  for (int i = 0; i < 8; ++i) {
    v[i] = h[i];
    v[i + 8] = iv(i);
  }
  v[12] ^= static_cast<uint32_t>(t);
  v[13] ^= static_cast<uint32_t>(t >> 32);
  if (last) v[14] = ~v[14];
  LMKV_UNROLL
  for (int r = 0; r < 10; ++r) {
    LMKV_B2S_G(v[0], v[4], v[8], v[12], m[sigma(r, 0)], m[sigma(r, 1)]);
    LMKV_B2S_G(v[1], v[5], v[9], v[13], m[sigma(r, 2)], m[sigma(r, 3)]);
    LMKV_B2S_G(v[2], v[6], v[10], v[14], m[sigma(r, 4)], m[sigma(r, 5)]);
    LMKV_B2S_G(v[3], v[7], v[11], v[15], m[sigma(r, 6)], m[sigma(r, 7)]);
    LMKV_B2S_G(v[0], v[5], v[10], v[15], m[sigma(r, 8)], m[sigma(r, 9)]);
    LMKV_B2S_G(v[1], v[6], v[11], v[12], m[sigma(r, 10)], m[sigma(r, 11)]);
    LMKV_B2S_G(v[2], v[7], v[8], v[13], m[sigma(r, 12)], m[sigma(r, 13)]);
    LMKV_B2S_G(v[3], v[4], v[9], v[14], m[sigma(r, 14)], m[sigma(r, 15)]);
  }
  for (int i = 0; i < 8; ++i) h[i] ^= v[i] ^ v[i + 8];
}

// BLAKE2s-128 with personalisation `domain` of the words tok[0..n) (each converted with static_cast to
// uint32: the caller has checked the range). Writes the digest as 4 words (little-endian byte order).
template <typename T>
LMKV_HD void hash_words(const T* tok, int64_t n, int domain, uint32_t out[4]) {
  uint32_t h[8];
  init(h, domain);
  const int64_t blocks = n == 0 ? 1 : (n + 15) / 16;
  uint32_t m[16];
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t base = b * 16;
    const bool last = b == blocks - 1;
    for (int w = 0; w < 16; ++w) m[w] = base + w < n ? static_cast<uint32_t>(tok[base + w]) : 0u;
    compress(h, m, last ? static_cast<uint64_t>(n) * 4u : static_cast<uint64_t>(base + 16) * 4u, last);
  }
  for (int i = 0; i < 4; ++i) out[i] = h[i];
}

// B(a || b, domain) for two 16-byte digests (one 32-byte block): the chain and segment nodes.
LMKV_HD void hash_pair(const uint32_t a[4], const uint32_t b[4], int domain, uint32_t out[4]) {
  uint32_t h[8];
  init(h, domain);
  uint32_t m[16];
  for (int i = 0; i < 4; ++i) {
    m[i] = a[i];
    m[i + 4] = b[i];
  }
  for (int i = 8; i < 16; ++i) m[i] = 0u;
  compress(h, m, 32u, true);
  for (int i = 0; i < 4; ++i) out[i] = h[i];
}

// Digest words -> 16 bytes (little-endian, as hashlib's digest()).
LMKV_HD void store_digest(const uint32_t d[4], uint8_t* out) {
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<uint8_t>(d[i] >> (8 * j));
}

LMKV_HD void load_digest(const uint8_t* in, uint32_t d[4]) {
  for (int i = 0; i < 4; ++i)
    d[i] = static_cast<uint32_t>(in[4 * i]) | (static_cast<uint32_t>(in[4 * i + 1]) << 8) |
           (static_cast<uint32_t>(in[4 * i + 2]) << 16) | (static_cast<uint32_t>(in[4 * i + 3]) << 24);
}

// Number of keys for a sequence of n tokens.
LMKV_HD int64_t num_chunks(int64_t n, int64_t chunk_size, bool include_partial) {
  return n / chunk_size + ((include_partial && n % chunk_size) ? 1 : 0);
}

}  // namespace b2s
}  // namespace lmkv
