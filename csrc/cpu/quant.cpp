// int8 / fp8 (e4m3) / KIVI row kernels, CPU: one row per task, rows in parallel (at::parallel_for).
// Limits: CPU tensors only; inputs float32 [R, N] contiguous (the Python wrapper casts and copies). The row math
// lives in lmkv/quant.h and matches reference/quant.py bit for bit; the wrappers only check what keeps them
// memory-safe (shapes, dtypes, bits, group), the Python op layer validates everything else.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

// The reference rounds q * scale and + min separately: no fused multiply-add in the kernels below.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "lmkv/quant.h"

namespace {

using lmkv::quant::packed_bytes;

int64_t grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

void check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2, op,
              ": x must be a float32 CPU tensor [R, N]");
}

void check_scales(const at::Tensor& s, int64_t rows, int64_t cols, const char* op) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == rows * cols, op,
              ": scales must be float32 with ", rows * cols, " values");
}

// int8 and fp8 share one layout: a float32 scale per row and one code byte per value; only the row math differs.
template <typename Code, typename EncodeRow>
std::tuple<at::Tensor, at::Tensor> scaled_encode(const at::Tensor& x_in, at::ScalarType code_type, const char* op,
                                                 EncodeRow encode_row) {
  check_rows(x_in, op);
  auto x = x_in.contiguous();
  const int64_t R = x.size(0), N = x.size(1);
  auto scales = at::empty({R}, at::kFloat);
  auto codes = at::empty({R, N}, code_type);
  const float* xp = x.data_ptr<float>();
  float* sp = scales.data_ptr<float>();
  Code* qp = codes.data_ptr<Code>();
  at::parallel_for(0, R, grain(N), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) encode_row(xp + r * N, N, sp + r, qp + r * N);
  });
  return {scales, codes};
}

template <typename Code, typename DecodeRow>
at::Tensor scaled_decode(const at::Tensor& scales_in, const at::Tensor& codes_in, at::ScalarType code_type,
                         const char* op, DecodeRow decode_row) {
  TORCH_CHECK(codes_in.scalar_type() == code_type && codes_in.dim() == 2, op, ": codes must be ", code_type,
              " [R, N]");
  const int64_t R = codes_in.size(0), N = codes_in.size(1);
  check_scales(scales_in, R, 1, op);
  auto scales = scales_in.contiguous();
  auto codes = codes_in.contiguous();
  auto out = at::empty({R, N}, at::kFloat);
  const float* sp = scales.data_ptr<float>();
  const Code* qp = codes.data_ptr<Code>();
  float* outp = out.data_ptr<float>();
  at::parallel_for(0, R, grain(N), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) decode_row(sp[r], qp + r * N, N, outp + r * N);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> int8_encode(const at::Tensor& x) {
  return scaled_encode<int8_t>(x, at::kChar, "quant_int8_encode", lmkv::quant::int8_encode_row);
}

at::Tensor int8_decode(const at::Tensor& scales, const at::Tensor& codes) {
  return scaled_decode<int8_t>(scales, codes, at::kChar, "quant_int8_decode", lmkv::quant::int8_decode_row);
}

std::tuple<at::Tensor, at::Tensor> fp8_encode(const at::Tensor& x) {
  return scaled_encode<uint8_t>(x, at::kByte, "quant_fp8_encode", lmkv::quant::fp8_encode_row);
}

at::Tensor fp8_decode(const at::Tensor& scales, const at::Tensor& codes) {
  return scaled_decode<uint8_t>(scales, codes, at::kByte, "quant_fp8_decode", lmkv::quant::fp8_decode_row);
}

void check_kivi(int64_t bits, int64_t group, const char* op) {
  TORCH_CHECK(bits == 2 || bits == 4, op, ": bits must be 2 or 4");
  TORCH_CHECK(group >= 1, op, ": group must be >= 1");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kivi_encode(const at::Tensor& x_in, int64_t bits, int64_t group) {
  check_rows(x_in, "quant_kivi_encode");
  check_kivi(bits, group, "quant_kivi_encode");
  auto x = x_in.contiguous();
  const int64_t R = x.size(0), N = x.size(1), G = (N + group - 1) / group, B = packed_bytes(N, (int)bits);
  auto mins = at::empty({R, G}, at::kFloat);
  auto scales = at::empty({R, G}, at::kFloat);
  auto packed = at::empty({R, B}, at::kByte);
  const float* xp = x.data_ptr<float>();
  float* mp = mins.data_ptr<float>();
  float* sp = scales.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  at::parallel_for(0, R, grain(N), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      lmkv::quant::kivi_encode_row(xp + r * N, N, (int)bits, group, mp + r * G, sp + r * G, pp + r * B);
  });
  return {mins, scales, packed};
}

at::Tensor kivi_decode(const at::Tensor& mins_in, const at::Tensor& scales_in, const at::Tensor& packed_in,
                       int64_t bits, int64_t group, int64_t n) {
  check_kivi(bits, group, "quant_kivi_decode");
  TORCH_CHECK(n >= 0, "quant_kivi_decode: n must be >= 0");
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.dim() == 2 &&
                  packed_in.size(1) == packed_bytes(n, (int)bits),
              "quant_kivi_decode: packed must be uint8 [R, ceil(n * bits / 8)]");
  const int64_t R = packed_in.size(0), G = (n + group - 1) / group, B = packed_in.size(1);
  check_scales(mins_in, R, G, "quant_kivi_decode");
  check_scales(scales_in, R, G, "quant_kivi_decode");
  auto mins = mins_in.contiguous();
  auto scales = scales_in.contiguous();
  auto packed = packed_in.contiguous();
  auto out = at::empty({R, n}, at::kFloat);
  const float* mp = mins.data_ptr<float>();
  const float* sp = scales.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, grain(n), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      lmkv::quant::kivi_decode_row(mp + r * G, sp + r * G, pp + r * B, (int)bits, group, n, op + r * n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmkv, m) {
  m.def("quant_int8_encode(Tensor x) -> (Tensor, Tensor)");
  m.def("quant_int8_decode(Tensor scales, Tensor codes) -> Tensor");
  m.def("quant_fp8_encode(Tensor x) -> (Tensor, Tensor)");
  m.def("quant_fp8_decode(Tensor scales, Tensor codes) -> Tensor");
  m.def("quant_kivi_encode(Tensor x, int bits, int group) -> (Tensor, Tensor, Tensor)");
  m.def("quant_kivi_decode(Tensor mins, Tensor scales, Tensor packed, int bits, int group, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmkv, CPU, m) {
  m.impl("quant_int8_encode", &int8_encode);
  m.impl("quant_int8_decode", &int8_decode);
  m.impl("quant_fp8_encode", &fp8_encode);
  m.impl("quant_fp8_decode", &fp8_decode);
  m.impl("quant_kivi_encode", &kivi_encode);
  m.impl("quant_kivi_decode", &kivi_decode);
}
