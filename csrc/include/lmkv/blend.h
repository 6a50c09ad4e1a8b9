// CacheBlend RoPE re-rotation core, torch-free, shared by csrc/cpu/blend.cpp and csrc/cuda/blend.cu.
//
// Keys are rows of D values (one token, one head) laid out as [M, T, H, D] contiguous (M = any leading dims).
// Each row of token t is rotated by angle delta[t] * inv_freq[i] on the first R dims, half-split (HF
// rotate_half) convention; dims R..D pass through. Math in fp32, as the reference does: the angle is the fp32
// product of the (exactly representable, |delta| < 2^24) delta and the fp32 frequency.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LMKV_BLEND_HD __host__ __device__ __forceinline__
#else
#define LMKV_BLEND_HD inline
#endif

namespace lmkv {
namespace blend {

// Angle of frequency i for a token moved by delta positions.
LMKV_BLEND_HD float rope_angle(int64_t delta, float inv_freq) { return static_cast<float>(delta) * inv_freq; }

// Rotate the pair (x1, x2) = (k[i], k[i + R/2]) by an angle given as its cosine and sine.
LMKV_BLEND_HD void rotate_pair(float x1, float x2, float c, float s, float* o1, float* o2) {
  *o1 = x1 * c - x2 * s;
  *o2 = x2 * c + x1 * s;
}

// Token index of flat row `row` (= ((m * T) + t) * H + h) in a [M, T, H, D] tensor.
LMKV_BLEND_HD int64_t token_of_row(int64_t row, int64_t tokens, int64_t heads) { return (row / heads) % tokens; }

// Rotate one row given per-frequency cos/sin (length R/2). Load/Store convert between the storage type and fp32.
template <typename T, typename Load, typename Store>
LMKV_BLEND_HD void rerotate_row(const T* in, T* out, const float* cos_t, const float* sin_t, int64_t head_dim,
                                int64_t rotary_dim, Load load, Store store) {
  const int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    float o1, o2;
    rotate_pair(load(in[i]), load(in[i + half]), cos_t[i], sin_t[i], &o1, &o2);
    out[i] = store(o1);
    out[i + half] = store(o2);
  }
  for (int64_t i = rotary_dim; i < head_dim; ++i) out[i] = in[i];
}

}  // namespace blend
}  // namespace lmkv
