// lmkv range coder: 32-bit range, 16-bit frequency tables, LZMA-style carry propagation.
// Torch-free, shared by csrc/cpu/codec*.cpp and csrc/cuda/codec*.cu. The arithmetic is specified in
// reference/codec_rangecoder.py and must stay bit-for-bit identical to it (the tests compare bytes).
// Limits: alphabets of at most 256 symbols; a table row is n + 1 uint32/int32 cumulative frequencies with
// cdf[0] = 0 and cdf[n] = 65536; every coded symbol must have a non-zero frequency (the caller guarantees it).
#pragma once

#include <stdint.h>

#include "lmkv/common.h"

namespace lmkv {
namespace rc {

constexpr uint32_t kPrecision = 16;
constexpr uint32_t kTop = 1u << 24;

// Worst case bytes of one coded stream of t symbols: <= 16.01 bits per symbol plus the flush.
LMKV_HD uint64_t max_stream_bytes(int64_t t) { return (uint64_t)t * 2u + (uint64_t)t / 64u + 16u; }

struct Encoder {
  uint64_t low;
  uint32_t range;
  uint32_t cache;
  uint64_t pending;
  uint8_t* out;
  uint64_t n;      // bytes emitted so far, including the dropped leading byte
  uint64_t cap;    // capacity of out (excluding the dropped byte)
  bool overflow;

  LMKV_HD void init(uint8_t* dst, uint64_t capacity) {
    low = 0; range = 0xFFFFFFFFu; cache = 0; pending = 1; out = dst; n = 0; cap = capacity; overflow = false;
  }
  LMKV_HD void put(uint32_t byte) {
    // The first byte is always 0 (the coded value is < 1): it is counted but not stored.
    if (n > 0) {
      if (n - 1 < cap) out[n - 1] = (uint8_t)byte; else overflow = true;
    }
    ++n;
  }
  LMKV_HD void shift_low() {
    if (low < 0xFF000000ull || low > 0xFFFFFFFFull) {
      uint32_t carry = (uint32_t)(low >> 32);
      put((cache + carry) & 0xFFu);
      for (; pending > 1; --pending) put((0xFFu + carry) & 0xFFu);
      pending = 0;
      cache = (uint32_t)(low >> 24) & 0xFFu;
    }
    ++pending;
    low = (low & 0x00FFFFFFull) << 8;
  }
  LMKV_HD void encode(uint32_t cum, uint32_t freq) {
    uint32_t r = range >> kPrecision;
    low += (uint64_t)r * cum;
    range = r * freq;
    while (range < kTop) {
      range <<= 8;
      shift_low();
    }
  }
  // Flushes and returns the stream length (leading byte dropped, trailing zero bytes trimmed).
  LMKV_HD uint64_t finish() {
    uint64_t hi = low + range;
    for (int k = 33; k >= 0; --k) {
      uint64_t step = 1ull << k;
      uint64_t x = (low + step - 1) & ~(step - 1);
      if (x < hi) { low = x; break; }
    }
    for (int i = 0; i < 5; ++i) shift_low();
    uint64_t len = n - 1;
    if (len > cap) len = cap;
    while (len > 0 && out[len - 1] == 0) --len;
    return len;
  }
};

struct Decoder {
  const uint8_t* in;
  uint64_t len;
  uint64_t pos;
  uint32_t range;
  uint32_t code;

  LMKV_HD uint32_t next() {
    uint32_t b = pos < len ? in[pos] : 0u;
    ++pos;
    return b;
  }
  LMKV_HD void init(const uint8_t* src, uint64_t length) {
    in = src; len = length; pos = 0; range = 0xFFFFFFFFu; code = 0;
    for (int i = 0; i < 4; ++i) code = (code << 8) | next();
  }
  // cdf: n + 1 entries. Returns the s with cdf[s] <= v < cdf[s + 1].
  template <typename CdfT>
  LMKV_HD uint32_t decode(const CdfT* cdf, int n) {
    uint32_t r = range >> kPrecision;
    uint32_t v = code / r;
    if (v > 0xFFFFu) v = 0xFFFFu;
    uint32_t s = 0;
    for (int i = 1; i <= n; ++i) s += ((uint32_t)cdf[i] <= v) ? 1u : 0u;  // branch-free, vectorisable
    uint32_t lo = (uint32_t)cdf[s];
    code -= r * lo;
    range = r * ((uint32_t)cdf[s + 1] - lo);
    while (range < kTop) {
      code = (code << 8) | next();
      range <<= 8;
    }
    return s;
  }
};

// One stream: t symbols (stride 1) coded with one table; returns the byte length, or UINT64_MAX on overflow.
template <typename CdfT>
LMKV_HD uint64_t encode_stream(const uint8_t* sym, int64_t t, const CdfT* cdf, uint8_t* out, uint64_t cap) {
  Encoder e;
  e.init(out, cap);
  for (int64_t i = 0; i < t; ++i) {
    uint32_t s = sym[i];
    uint32_t lo = (uint32_t)cdf[s];
    e.encode(lo, (uint32_t)cdf[s + 1] - lo);
  }
  uint64_t len = e.finish();
  return e.overflow ? ~0ull : len;
}

// Same result as Decoder::decode (the s with cdf[s] <= v < cdf[s + 1] is unique), found through a 256-entry
// table indexed by the top 8 bits of v, then a short forward scan: the CPU path, where the table is cheap.
struct LutDecoder {
  uint8_t lut[256];
  template <typename CdfT>
  inline void build(const CdfT* cdf, int n) {
    int s = 0;
    for (int j = 0; j < 256; ++j) {
      uint32_t v = (uint32_t)j << 8;
      while (s + 1 < n && (uint32_t)cdf[s + 1] <= v) ++s;
      lut[j] = (uint8_t)s;
    }
  }
  template <typename CdfT>
  inline void run(const uint8_t* in, uint64_t len, const CdfT* cdf, uint8_t* sym, int64_t t) {
    Decoder d;
    d.init(in, len);
    for (int64_t i = 0; i < t; ++i) {
      uint32_t r = d.range >> kPrecision;
      uint32_t v = d.code / r;
      if (v > 0xFFFFu) v = 0xFFFFu;
      uint32_t s = lut[v >> 8];
      while ((uint32_t)cdf[s + 1] <= v) ++s;
      uint32_t lo = (uint32_t)cdf[s];
      d.code -= r * lo;
      d.range = r * ((uint32_t)cdf[s + 1] - lo);
      while (d.range < kTop) {
        d.code = (d.code << 8) | d.next();
        d.range <<= 8;
      }
      sym[i] = (uint8_t)s;
    }
  }
};

template <typename CdfT>
LMKV_HD void decode_stream(const uint8_t* in, uint64_t len, const CdfT* cdf, int n, uint8_t* sym, int64_t t) {
  Decoder d;
  d.init(in, len);
  for (int64_t i = 0; i < t; ++i) sym[i] = (uint8_t)d.decode(cdf, n);
}

}  // namespace rc
}  // namespace lmkv
