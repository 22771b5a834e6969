// Shared definitions: tile constants, the Problem view, ISA selection, input checks, output store.
// Part of the weight-stationary int4 GEMM (kernels/cpu/int4_gemm.cpp: the layout, the arithmetic and why
// every path computes the same bits). Included once, by int4_gemm.cpp: anonymous namespace.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARKSERVE_X86 1
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kBlockN = 64;
constexpr int64_t kHalfN = 32;                // channels per work unit of the register paths
constexpr int64_t kTileBytes = 16 * kBlockN;  // codes of one (plane, tile, group)
constexpr int kShift[8] = {0, 8, 16, 24, 4, 12, 20, 28};  // bit of input 8 t + i's code in lane (t, c)
constexpr int64_t kPassRows = 4;              // rows per register pass over 64 channels
constexpr int64_t kWidePassRows = 8;          // AVX-512: rows per register pass over 32 channels

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

struct Problem {
  const float* x;          // [M, K]
  const uint8_t* codes;    // [P, NB, G, 4, 64, 4]
  const float* scales;     // [P, NB, G, 64]
  const float* zeros;      // [P, NB, G, 64]
  int64_t m, n, k, planes, num_tiles, groups;

  const uint8_t* tile_codes(int64_t p, int64_t b, int64_t g) const {
    return codes + ((p * num_tiles + b) * groups + g) * kTileBytes;
  }
  int64_t sz_offset(int64_t p, int64_t b, int64_t g) const { return ((p * num_tiles + b) * groups + g) * kBlockN; }
};

// Code (0..15) of input kk (0..31 in the group) of channel ch, from one (plane, tile, group)'s codes.
inline int code_at(const uint8_t* c, int64_t kk, int64_t ch) {
  const uint8_t byte = c[((kk / 8) * kBlockN + ch) * 4 + kk % 4];
  return kk % 8 < 4 ? byte & 15 : byte >> 4;
}

bool isa_supported(int64_t isa) {
  if (isa == kPortable) return true;
#ifdef SPARKSERVE_X86
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f");
#endif
  return false;
}

int64_t best_isa() {
  for (int64_t isa : {kAvx512, kAvx2}) {
    if (isa_supported(isa)) return isa;
  }
  return kPortable;
}

// isa >= 0 as given; -1 (the wrappers' default): SPARKSERVE_INT4_ISA if set, else `best` (read per call:
// getenv is cheap, and the Python wrappers then cost no environment lookup).
int64_t resolve_isa(int64_t isa, int64_t best) {
  if (isa >= 0) return isa;
  const char* forced = std::getenv("SPARKSERVE_INT4_ISA");
  if (forced == nullptr || *forced == '\0') return best;
  const char* names[] = {"portable", "avx2", "avx512"};
  for (int64_t i = 0; i < 3; ++i) {
    if (std::strcmp(forced, names[i]) == 0) return i;
  }
  TORCH_CHECK(false, "SPARKSERVE_INT4_ISA must be one of avx2, avx512, portable, got ", forced);
}

// out[:, b * 64 + c0 .. + width) (columns < n) = acc[:, c0 .. c0 + width) rounded to OutT.
template <typename Pr, typename OutT>
void store_rows(const Pr& pr, int64_t b, const float* acc, OutT* out, int64_t c0 = 0, int64_t width = kBlockN) {
  const int64_t n0 = b * kBlockN + c0;
  const int64_t end = std::min(width, pr.n - n0);
  for (int64_t r = 0; r < pr.m; ++r) {
    for (int64_t ch = 0; ch < end; ++ch) out[r * pr.n + n0 + ch] = static_cast<OutT>(acc[r * kBlockN + c0 + ch]);
  }
}

// The checks both kernels share: x [M, K], codes [P, N / 64, K / 32, 4, 64, 4], scales / zeros
// [P, N / 64, K / 32, 64], n, out_dtype.
void check_tiles(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                 int64_t n, at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be float32 or bfloat16 [M, K]");
  TORCH_CHECK(codes.dim() == 6 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(3) == 4 &&
                  codes.size(4) == kBlockN && codes.size(5) == 4,
              "codes must be contiguous uint8 [P, N / 64, K / 32, 4, 64, 4]");
  const int64_t planes = codes.size(0), num_tiles = codes.size(1), groups = codes.size(2);
  for (const at::Tensor* t : {&scales, &zeros}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->sizes() == at::IntArrayRef({planes, num_tiles, groups, kBlockN}),
                "scales / zeros must be contiguous float32 [P, N / 64, K / 32, 64]");
  }
  TORCH_CHECK(x.size(1) == groups * kGroup, "x has K = ", x.size(1), ", the weight ", groups * kGroup);
  TORCH_CHECK(n > (num_tiles - 1) * kBlockN && n <= num_tiles * kBlockN, "n = ", n, " does not fit ", num_tiles, " tiles");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, "out_dtype must be float32 or bfloat16");
}

// x [M, K] as contiguous fp32 rows: x's own data, or bf16 widened (exact) into `widened`.
const float* float_rows(const at::Tensor& x, std::vector<float>& widened) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  const c10::BFloat16* src = x.data_ptr<c10::BFloat16>();
  widened.resize(static_cast<size_t>(x.numel()));
  for (size_t i = 0; i < widened.size(); ++i) widened[i] = static_cast<float>(src[i]);
  return widened.data();
}

}  // namespace
