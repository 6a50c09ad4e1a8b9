// CPU (OpenMP) RoPE re-rotation for CacheBlend: torch.ops.lmkv.blend_rerotate.
// Limits: contiguous [M, T, H, D] keys in fp32/fp16/bf16, int64 deltas [T], fp32 inv_freq [R/2]; CPU tensors only.
// cos/sin are tabulated once per token ([T, R/2]) and reused by all M * H rows of that token.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "lmkv/blend.h"

namespace {

at::Tensor blend_rerotate(const at::Tensor& keys, const at::Tensor& delta, const at::Tensor& inv_freq,
                          int64_t rotary_dim) {
  TORCH_CHECK(keys.device().is_cpu() && delta.device().is_cpu() && inv_freq.device().is_cpu(),
              "blend_rerotate: CPU tensors only");
  TORCH_CHECK(keys.dim() >= 3, "blend_rerotate: keys must be [..., T, H, D]");
  TORCH_CHECK(delta.scalar_type() == at::kLong && delta.dim() == 1, "blend_rerotate: delta must be int64 [T]");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1, "blend_rerotate: inv_freq must be f32");
  const int64_t D = keys.size(-1), H = keys.size(-2), T = keys.size(-3);
  TORCH_CHECK(delta.size(0) == T, "blend_rerotate: delta length must equal T");
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= D, "blend_rerotate: bad rotary_dim");
  TORCH_CHECK(inv_freq.size(0) == rotary_dim / 2, "blend_rerotate: inv_freq must have rotary_dim / 2 entries");
  const int64_t half = rotary_dim / 2;
  at::Tensor in = keys.contiguous();
  at::Tensor out = at::empty_like(in);
  const at::Tensor d = delta.contiguous();
  const at::Tensor f = inv_freq.contiguous();
  const int64_t* dp = d.data_ptr<int64_t>();
  const float* fp = f.data_ptr<float>();
  std::vector<float> cos_tab(static_cast<size_t>(T * half)), sin_tab(static_cast<size_t>(T * half));
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = 0; i < half; ++i) {
        const float a = lmkv::blend::rope_angle(dp[t], fp[i]);
        cos_tab[t * half + i] = std::cos(a);
        sin_tab[t * half + i] = std::sin(a);
      }
  });
  const int64_t rows = in.numel() / D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "blend_rerotate", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    auto load = [](scalar_t v) { return static_cast<float>(v); };
    auto store = [](float v) { return static_cast<scalar_t>(v); };
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = lmkv::blend::token_of_row(r, T, H);
        lmkv::blend::rerotate_row(src + r * D, dst + r * D, &cos_tab[t * half], &sin_tab[t * half], D, rotary_dim,
                                  load, store);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmkv, m) {
  m.def("blend_rerotate(Tensor keys, Tensor delta, Tensor inv_freq, int rotary_dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmkv, CPU, m) { m.impl("blend_rerotate", &blend_rerotate); }
