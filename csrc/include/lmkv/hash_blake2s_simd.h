// Eight BLAKE2s-128 leaves at once, one per 32-bit SIMD lane (CPU only; torch-free).
//
// Limits: GCC/Clang vector extensions (one AVX2 register on x86-64, emulated elsewhere); byte-rotations use a
// byte shuffle on little-endian GCC builds. All lanes hash the same number of words n. Digests equal
// lmkv::b2s::hash_words (hash_blake2s.h) lane by lane.
#pragma once

#include <cstdint>
#include <cstring>

#include "lmkv/hash_blake2s.h"

namespace lmkv {
namespace b2s {

#define LMKV_HASH_LANES 8
constexpr int W = LMKV_HASH_LANES;
typedef uint32_t u32xW __attribute__((vector_size(W * 4)));

static inline u32xW rotrv(u32xW x, int n) { return (x >> n) | (x << (32 - n)); }

// Rotations by whole bytes as one byte shuffle (vpshufb) instead of shift+shift+or: ~15 % fewer vector ops.
#if defined(__GNUC__) && !defined(__clang__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && LMKV_HASH_LANES == 8
typedef uint8_t u8xW __attribute__((vector_size(W * 4)));
static inline u32xW rotr16(u32xW x) {
  const u8xW mask = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13,
                     18, 19, 16, 17, 22, 23, 20, 21, 26, 27, 24, 25, 30, 31, 28, 29};
  return reinterpret_cast<u32xW>(__builtin_shuffle(reinterpret_cast<u8xW>(x), mask));
}
static inline u32xW rotr8(u32xW x) {
  const u8xW mask = {1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12,
                     17, 18, 19, 16, 21, 22, 23, 20, 25, 26, 27, 24, 29, 30, 31, 28};
  return reinterpret_cast<u32xW>(__builtin_shuffle(reinterpret_cast<u8xW>(x), mask));
}
#else
static inline u32xW rotr16(u32xW x) { return rotrv(x, 16); }
static inline u32xW rotr8(u32xW x) { return rotrv(x, 8); }
#endif

#define LMKV_G8(a, b, c, d, x, y) \
  do {                            \
    a = a + b + (x);              \
    d = rotr16(d ^ a);             \
    c = c + d;                    \
    b = rotrv(b ^ c, 12);         \
    a = a + b + (y);              \
    d = rotr8(d ^ a);              \
    c = c + d;                    \
    b = rotrv(b ^ c, 7);          \
  } while (0)

// Message words of one block, transposed so that m[w] holds word w of every lane.
#if defined(__GNUC__) && !defined(__clang__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && LMKV_HASH_LANES == 8
#define LMKV_HASH_TRANSPOSE 1
static inline u32xW load8(const uint32_t* p) {
  u32xW v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
static inline u32xW load8(const uint64_t* p) {  // eight 64-bit ids (< 2**32) -> their low words
  u32xW a, b;
  std::memcpy(&a, p, sizeof(a));
  std::memcpy(&b, p + 4, sizeof(b));
  return __builtin_shuffle(a, b, u32xW{0, 2, 4, 6, 8, 10, 12, 14});
}
// 8x8 transpose of 32-bit words (unpack 32, unpack 64, swap 128-bit halves): r[l][w] -> m[w][l].
static inline void transpose8(const u32xW r[8], u32xW* m) {
  const u32xW lo32{0, 8, 1, 9, 4, 12, 5, 13}, hi32{2, 10, 3, 11, 6, 14, 7, 15};
  const u32xW lo64{0, 1, 8, 9, 4, 5, 12, 13}, hi64{2, 3, 10, 11, 6, 7, 14, 15};
  const u32xW lo128{0, 1, 2, 3, 8, 9, 10, 11}, hi128{4, 5, 6, 7, 12, 13, 14, 15};
  u32xW t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = __builtin_shuffle(r[2 * i], r[2 * i + 1], lo32);
    t[2 * i + 1] = __builtin_shuffle(r[2 * i], r[2 * i + 1], hi32);
  }
  for (int h = 0; h < 2; ++h) {  // lanes 0-3 (h = 0) and 4-7 (h = 1)
    u[4 * h + 0] = __builtin_shuffle(t[4 * h + 0], t[4 * h + 2], lo64);  // words 0, 4
    u[4 * h + 1] = __builtin_shuffle(t[4 * h + 0], t[4 * h + 2], hi64);  // words 1, 5
    u[4 * h + 2] = __builtin_shuffle(t[4 * h + 1], t[4 * h + 3], lo64);  // words 2, 6
    u[4 * h + 3] = __builtin_shuffle(t[4 * h + 1], t[4 * h + 3], hi64);  // words 3, 7
  }
  for (int w = 0; w < 4; ++w) {
    m[w] = __builtin_shuffle(u[w], u[4 + w], lo128);
    m[w + 4] = __builtin_shuffle(u[w], u[4 + w], hi128);
  }
}
#endif

// W leaves of n tokens each: lane l hashes ptrs[l][0 .. n) into out[l][0..4).
template <typename T>
void leaf_lanes(const T* const* ptrs, int64_t n, uint32_t (*out)[4]) {
  u32xW h[8];
  uint32_t h0[8];
  init(h0, kLeaf);
  for (int i = 0; i < 8; ++i) h[i] = u32xW{} + h0[i];
  const int64_t blocks = n == 0 ? 1 : (n + 15) / 16;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t base = b * 16;
    const bool last = b == blocks - 1;
    u32xW m[16];
    alignas(32) uint32_t lanes[W];
    if (base + 16 <= n) {  // every block but a partial last one: no bounds checks in the transpose
#ifdef LMKV_HASH_TRANSPOSE
      u32xW r[8];
      for (int l = 0; l < W; ++l) r[l] = load8(ptrs[l] + base);
      transpose8(r, m);
      for (int l = 0; l < W; ++l) r[l] = load8(ptrs[l] + base + 8);
      transpose8(r, m + 8);
#else
      for (int w = 0; w < 16; ++w) {
        for (int l = 0; l < W; ++l) lanes[l] = static_cast<uint32_t>(ptrs[l][base + w]);
        std::memcpy(&m[w], lanes, sizeof(lanes));
      }
#endif
    } else {
      for (int w = 0; w < 16; ++w) {
        const int64_t idx = base + w;
        for (int l = 0; l < W; ++l) lanes[l] = idx < n ? static_cast<uint32_t>(ptrs[l][idx]) : 0u;
        std::memcpy(&m[w], lanes, sizeof(lanes));
      }
    }
    const uint64_t t = last ? static_cast<uint64_t>(n) * 4u : static_cast<uint64_t>(base + 16) * 4u;
    u32xW v[16];
    for (int i = 0; i < 8; ++i) {
      v[i] = h[i];
      v[i + 8] = u32xW{} + iv(i);
    }
    v[12] ^= static_cast<uint32_t>(t);
    v[13] ^= static_cast<uint32_t>(t >> 32);
    if (last) v[14] = ~v[14];
    LMKV_UNROLL
    for (int r = 0; r < 10; ++r) {
      LMKV_G8(v[0], v[4], v[8], v[12], m[sigma(r, 0)], m[sigma(r, 1)]);
      LMKV_G8(v[1], v[5], v[9], v[13], m[sigma(r, 2)], m[sigma(r, 3)]);
      LMKV_G8(v[2], v[6], v[10], v[14], m[sigma(r, 4)], m[sigma(r, 5)]);
      LMKV_G8(v[3], v[7], v[11], v[15], m[sigma(r, 6)], m[sigma(r, 7)]);
      LMKV_G8(v[0], v[5], v[10], v[15], m[sigma(r, 8)], m[sigma(r, 9)]);
      LMKV_G8(v[1], v[6], v[11], v[12], m[sigma(r, 10)], m[sigma(r, 11)]);
      LMKV_G8(v[2], v[7], v[8], v[13], m[sigma(r, 12)], m[sigma(r, 13)]);
      LMKV_G8(v[3], v[4], v[9], v[14], m[sigma(r, 14)], m[sigma(r, 15)]);
    }
    for (int i = 0; i < 8; ++i) h[i] ^= v[i] ^ v[i + 8];
  }
  for (int i = 0; i < 4; ++i) {
    alignas(32) uint32_t lanes[W];
    std::memcpy(lanes, &h[i], sizeof(lanes));
    for (int l = 0; l < W; ++l) out[l][i] = lanes[l];
  }
}

}  // namespace b2s
}  // namespace lmkv
