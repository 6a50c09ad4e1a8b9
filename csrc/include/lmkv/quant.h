// Row kernels of the int8, fp8 (e4m3) and KIVI codecs, torch-free (g++ and nvcc alike).
// The spec is reference/quant.py: float32 arithmetic one IEEE operation at a time (never a fused multiply-add:
// the reference's q * scale + min rounds twice), round-half-to-even (rintf in the default rounding mode), a
// zero scale stores codes 0 and decodes to exact zeros. Every function here handles one row of n values.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lmkv/common.h"

namespace lmkv {
namespace quant {

constexpr float kInt8Max = 127.0f;
constexpr float kFp8Max = 448.0f;

// Multiply and add, each rounded once. On the host the including .cpp turns contraction off; CUDA needs the
// explicit intrinsics because nvcc contracts by default (--fmad=true).
LMKV_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LMKV_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

LMKV_HD uint32_t float_bits(float x) {
  uint32_t b;
  memcpy(&b, &x, 4);
  return b;
}

LMKV_HD float bits_float(uint32_t b) {
  float x;
  memcpy(&x, &b, 4);
  return x;
}

LMKV_HD float absmax(const float* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = fmaxf(m, fabsf(x[i]));
  return m;
}

LMKV_HD float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// float32 -> e4m3fn bit pattern, round to nearest even; y finite with |y| <= 448 (the caller clamps).
LMKV_HD uint8_t e4m3_from_float(float y) {
  const uint32_t b = float_bits(y);
  const uint8_t sign = (uint8_t)((b >> 24) & 0x80u);
  uint32_t a = b & 0x7FFFFFFFu;
  if (a >= 0x3C800000u) {  // >= 2^-6, the smallest normal e4m3: keep 3 of 23 mantissa bits, ties to even
    a += 0x7FFFFu + ((a >> 20) & 1u);
    return (uint8_t)(sign | ((a >> 20) - (120u << 3)));  // float exponent bias 127 -> e4m3 bias 7
  }
  // Subnormal e4m3: k * 2^-9 for k in 0..8 (k = 8 is 2^-6, whose bit pattern 0x08 is that normal number).
  // |y| * 512 is exact (a power of two), so rintf rounds the true value.
  return (uint8_t)(sign | (uint32_t)rintf(fabsf(y) * 512.0f));
}

LMKV_HD float e4m3_to_float(uint8_t c) {
  const uint32_t sign = (uint32_t)(c & 0x80u) << 24, e = (c >> 3) & 15u, m = c & 7u;
  if (e) return bits_float(sign | ((e + 120u) << 23) | (m << 20));
  const float v = (float)m * (1.0f / 512.0f);
  return sign ? -v : v;
}

// int8 row: scale = absmax / 127, q = clamp(rint(x / scale), -127, 127).
LMKV_HD void int8_encode_row(const float* x, int64_t n, float* scale, int8_t* q) {
  const float s = absmax(x, n) / kInt8Max;
  *scale = s;
  for (int64_t i = 0; i < n; ++i) q[i] = s == 0.0f ? 0 : (int8_t)clampf(rintf(x[i] / s), -kInt8Max, kInt8Max);
}

LMKV_HD void int8_decode_row(float s, const int8_t* q, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = mul_rn((float)q[i], s);
}

// fp8 row: scale = absmax / 448, code = e4m3(clamp(x / scale, -448, 448)).
LMKV_HD void fp8_encode_row(const float* x, int64_t n, float* scale, uint8_t* q) {
  const float s = absmax(x, n) / kFp8Max;
  *scale = s;
  for (int64_t i = 0; i < n; ++i) q[i] = s == 0.0f ? 0 : e4m3_from_float(clampf(x[i] / s, -kFp8Max, kFp8Max));
}

LMKV_HD void fp8_decode_row(float s, const uint8_t* q, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = mul_rn(e4m3_to_float(q[i]), s);
}

LMKV_HD int64_t packed_bytes(int64_t n, int bits) { return (n * bits + 7) / 8; }

// KIVI row: groups of `group` consecutive values (the last may be shorter), asymmetric min/scale per group,
// codes of `bits` bits packed little-endian into packed_bytes(n, bits) bytes (padding bits 0).
LMKV_HD void kivi_encode_row(const float* x, int64_t n, int bits, int64_t group, float* mins, float* scales,
                             uint8_t* packed) {
  const float qmax = (float)((1 << bits) - 1);
  const int64_t nbytes = packed_bytes(n, bits);
  for (int64_t i = 0; i < nbytes; ++i) packed[i] = 0;
  for (int64_t g0 = 0, g = 0; g0 < n; g0 += group, ++g) {
    const int64_t g1 = g0 + group < n ? g0 + group : n;
    float mn = x[g0], mx = x[g0];
    for (int64_t i = g0 + 1; i < g1; ++i) {
      mn = fminf(mn, x[i]);
      mx = fmaxf(mx, x[i]);
    }
    mn = mn + 0.0f;  // -0.0 -> +0.0, as the reference does (fminf/fmaxf may pick either signed zero)
    const float s = (mx - mn) / qmax + 0.0f;
    mins[g] = mn;
    scales[g] = s;
    if (s == 0.0f) continue;  // codes stay 0
    for (int64_t i = g0; i < g1; ++i) {
      const uint32_t q = (uint32_t)clampf(rintf((x[i] - mn) / s), 0.0f, qmax);
      packed[(i * bits) >> 3] |= (uint8_t)(q << ((i * bits) & 7));
    }
  }
}

LMKV_HD void kivi_decode_row(const float* mins, const float* scales, const uint8_t* packed, int bits, int64_t group,
                             int64_t n, float* out) {
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = i / group;
    const uint32_t q = (packed[(i * bits) >> 3] >> ((i * bits) & 7)) & mask;
    out[i] = add_rn(mul_rn((float)q, scales[g]), mins[g]);
  }
}

}  // namespace quant
}  // namespace lmkv
