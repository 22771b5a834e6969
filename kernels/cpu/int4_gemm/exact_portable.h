// The exact kernel, portable C++: the L1-buffer path (dequantise a tile and group, apply to every row).
// Part of the weight-stationary int4 GEMM (kernels/cpu/int4_gemm.cpp: the layout, the arithmetic and why
// every path computes the same bits). Included once, by int4_gemm.cpp: anonymous namespace.

#pragma once

#include "common.h"

namespace {

// ----------------------------------------------------------------------------- portable (buffer path)
void dequant_portable(const Problem& pr, int64_t b, int64_t g, float* w /* [32, 64] */) {
  for (int64_t p = 0; p < pr.planes; ++p) {
    const uint8_t* c = pr.tile_codes(p, b, g);
    const float* s = pr.scales + pr.sz_offset(p, b, g);
    const float* z = pr.zeros + pr.sz_offset(p, b, g);
    for (int64_t kk = 0; kk < kGroup; ++kk) {
      for (int64_t ch = 0; ch < kBlockN; ++ch) {
        const float v = std::fma(static_cast<float>(code_at(c, kk, ch)) - 8.0f, s[ch], z[ch]);
        float* wk = w + kk * kBlockN + ch;
        *wk = p == 0 ? v : *wk + v;
      }
    }
  }
}

void accumulate_portable(const Problem& pr, int64_t g, const float* w, float* acc) {
  for (int64_t r = 0; r < pr.m; ++r) {
    const float* xr = pr.x + r * pr.k + g * kGroup;
    float* a = acc + r * kBlockN;
    for (int64_t kk = 0; kk < kGroup; ++kk) {
      for (int64_t ch = 0; ch < kBlockN; ++ch) a[ch] = std::fma(xr[kk], w[kk * kBlockN + ch], a[ch]);
    }
  }
}

}  // namespace
