// CacheGen range coder, CPU: one independent stream per row, parallel over rows with OpenMP.
// Limits: CPU tensors only; symbols uint8 [S, T] contiguous, cdf int32 [S, n + 1] with n <= 256. The coder
// arithmetic lives in lmkv/rangecoder.h (shared with the CUDA kernels) and matches reference/codec_rangecoder.py
// byte for byte. Encoding writes each stream into its worst-case slot of a scratch buffer, then compacts.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "lmkv/rangecoder.h"

namespace {

void check_tables(const at::Tensor& symbols, const at::Tensor& cdf) {
  TORCH_CHECK(symbols.device().is_cpu() && cdf.device().is_cpu(), "codec_ac: CPU tensors only");
  TORCH_CHECK(symbols.scalar_type() == at::kByte && symbols.dim() == 2, "codec_ac: symbols must be uint8 [S, T]");
  TORCH_CHECK(cdf.scalar_type() == at::kInt && cdf.dim() == 2, "codec_ac: cdf must be int32 [S, n + 1]");
  TORCH_CHECK(cdf.size(0) == symbols.size(0), "codec_ac: cdf rows must match symbol rows");
  TORCH_CHECK(cdf.size(1) >= 2 && cdf.size(1) <= 257, "codec_ac: alphabet must have 1..256 symbols");
}

std::tuple<at::Tensor, at::Tensor> ac_encode(const at::Tensor& symbols_in, const at::Tensor& cdf_in) {
  check_tables(symbols_in, cdf_in);
  auto symbols = symbols_in.contiguous();
  auto cdf = cdf_in.contiguous();
  const int64_t S = symbols.size(0), T = symbols.size(1), W = cdf.size(1);
  const uint64_t slot = lmkv::rc::max_stream_bytes(T);
  auto lengths = at::empty({S}, at::kLong);
  auto scratch = at::empty({(int64_t)(S * slot)}, at::kByte);  // pages are touched only where written
  const uint8_t* sym = symbols.data_ptr<uint8_t>();
  const int32_t* tab = cdf.data_ptr<int32_t>();
  uint8_t* buf = scratch.data_ptr<uint8_t>();
  int64_t* len = lengths.data_ptr<int64_t>();
  bool overflow = false;
  at::parallel_for(0, S, 16, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      uint64_t n = lmkv::rc::encode_stream(sym + s * T, T, tab + s * W, buf + s * slot, slot);
      if (n == ~0ull) { overflow = true; n = 0; }
      len[s] = (int64_t)n;
    }
  });
  TORCH_CHECK(!overflow, "codec_ac_encode: a stream exceeded its worst-case size (bad table?)");
  std::vector<int64_t> offset(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) offset[s + 1] = offset[s] + len[s];
  auto out = at::empty({offset[S]}, at::kByte);
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, S, 256, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) std::memcpy(dst + offset[s], buf + s * slot, (size_t)len[s]);
  });
  return {out, lengths};
}

at::Tensor ac_decode(const at::Tensor& data_in, const at::Tensor& offsets_in, const at::Tensor& cdf_in,
                     int64_t T) {
  TORCH_CHECK(data_in.device().is_cpu() && data_in.scalar_type() == at::kByte && data_in.dim() == 1,
              "codec_ac_decode: data must be a uint8 CPU vector");
  TORCH_CHECK(cdf_in.scalar_type() == at::kInt && cdf_in.dim() == 2, "codec_ac_decode: cdf must be int32 [S, n+1]");
  TORCH_CHECK(cdf_in.size(1) >= 2 && cdf_in.size(1) <= 257, "codec_ac_decode: alphabet must have 1..256 symbols");
  TORCH_CHECK(offsets_in.scalar_type() == at::kLong && offsets_in.dim() == 1 &&
                  offsets_in.size(0) == cdf_in.size(0) + 1,
              "codec_ac_decode: offsets must be int64 [S + 1]");
  TORCH_CHECK(T >= 0, "codec_ac_decode: T must be >= 0");
  auto data = data_in.contiguous();
  auto offsets = offsets_in.contiguous();
  auto cdf = cdf_in.contiguous();
  const int64_t S = cdf.size(0), W = cdf.size(1), nbytes = data.size(0);
  const int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(off[s] >= 0 && off[s] <= off[s + 1] && off[s + 1] <= nbytes, "codec_ac_decode: bad offsets");
  }
  auto out = at::empty({S, T}, at::kByte);
  const uint8_t* in = data.data_ptr<uint8_t>();
  const int32_t* tab = cdf.data_ptr<int32_t>();
  uint8_t* sym = out.data_ptr<uint8_t>();
  at::parallel_for(0, S, 16, [&](int64_t begin, int64_t end) {
    lmkv::rc::LutDecoder dec;
    const int32_t* built = nullptr;
    for (int64_t s = begin; s < end; ++s) {
      const int32_t* row = tab + s * W;
      // Streams that share a table (lmkv's grouped tables) often share identical rows: rebuild only on change.
      if (built == nullptr || std::memcmp(built, row, sizeof(int32_t) * W) != 0) {
        dec.build(row, (int)(W - 1));
        built = row;
      }
      dec.run(in + off[s], (uint64_t)(off[s + 1] - off[s]), row, sym + s * T, T);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmkv, m) {
  m.def("codec_ac_encode(Tensor symbols, Tensor cdf) -> (Tensor, Tensor)");
  m.def("codec_ac_decode(Tensor data, Tensor offsets, Tensor cdf, int T) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmkv, CPU, m) {
  m.impl("codec_ac_encode", &ac_encode);
  m.impl("codec_ac_decode", &ac_decode);
}
