// The exact kernel with AVX2 + FMA: the L1-buffer path and register passes of up to 4 rows x 16 channels.
// Part of the weight-stationary int4 GEMM (kernels/cpu/int4_gemm.cpp: the layout, the arithmetic and why
// every path computes the same bits). Included once, by int4_gemm.cpp: anonymous namespace.

#pragma once

#include "common.h"

namespace {

#ifdef SPARKSERVE_X86
// ----------------------------------------------------------------------------- AVX2 + FMA
// q - 8 as fp32 for the code of input 8 t + i of each 32-bit lane of v (exact).
__attribute__((target("avx2,fma"))) inline __m256 code_avx2(__m256i v, int shift) {
  const __m256i q = _mm256_and_si256(_mm256_srli_epi32(v, shift), _mm256_set1_epi32(15));
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(8)));
}

__attribute__((target("avx2,fma"))) void dequant_avx2(const Problem& pr, int64_t b, int64_t g, float* w) {
  for (int64_t p = 0; p < pr.planes; ++p) {
    const uint8_t* c = pr.tile_codes(p, b, g);
    const float* s = pr.scales + pr.sz_offset(p, b, g);
    const float* z = pr.zeros + pr.sz_offset(p, b, g);
    for (int64_t c8 = 0; c8 < kBlockN; c8 += 8) {
      const __m256 sv = _mm256_loadu_ps(s + c8);
      const __m256 zv = _mm256_loadu_ps(z + c8);
      for (int64_t t = 0; t < 4; ++t) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + (t * kBlockN + c8) * 4));
        for (int i = 0; i < 8; ++i) {
          __m256 wv = _mm256_fmadd_ps(code_avx2(v, kShift[i]), sv, zv);
          float* wk = w + (8 * t + i) * kBlockN + c8;
          if (p > 0) wv = _mm256_add_ps(_mm256_load_ps(wk), wv);
          _mm256_store_ps(wk, wv);
        }
      }
    }
  }
}

// MR rows x 32 channels (4 ymm each) over one group.
template <int MR>
__attribute__((target("avx2,fma"))) inline void micro_avx2(const float* const* xr, const float* w, float* const* a) {
  __m256 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_loadu_ps(a[r] + 8 * i);
  for (int kk = 0; kk < kGroup; ++kk) {
    const float* wk = w + kk * kBlockN;
    const __m256 w0 = _mm256_load_ps(wk), w1 = _mm256_load_ps(wk + 8);
    const __m256 w2 = _mm256_load_ps(wk + 16), w3 = _mm256_load_ps(wk + 24);
    for (int r = 0; r < MR; ++r) {
      const __m256 xb = _mm256_broadcast_ss(xr[r] + kk);
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
      acc[r][2] = _mm256_fmadd_ps(xb, w2, acc[r][2]);
      acc[r][3] = _mm256_fmadd_ps(xb, w3, acc[r][3]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(a[r] + 8 * i, acc[r][i]);
}

__attribute__((target("avx2,fma"))) void accumulate_avx2(const Problem& pr, int64_t g, const float* w, float* acc) {
  for (int64_t half = 0; half < kBlockN; half += 32) {
    int64_t r = 0;
    for (; r + 2 <= pr.m; r += 2) {
      const float* xr[2] = {pr.x + r * pr.k + g * kGroup, pr.x + (r + 1) * pr.k + g * kGroup};
      float* a[2] = {acc + r * kBlockN + half, acc + (r + 1) * kBlockN + half};
      micro_avx2<2>(xr, w + half, a);
    }
    if (r < pr.m) {
      const float* xr[1] = {pr.x + r * pr.k + g * kGroup};
      float* a[1] = {acc + r * kBlockN + half};
      micro_avx2<1>(xr, w + half, a);
    }
  }
}

// Register pass: MR rows (x: row 0 of the pass) x 8 CW channels from channel c0 of tile b, P planes,
// whole K; writes the fp32 sums to acc [MR, 64] at column c0.
template <int MR, int CW, int P>
__attribute__((target("avx2,fma"))) void pass_avx2(const Problem& pr, int64_t b, int64_t c0, const float* x, float* acc) {
  __m256 a[MR][CW];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < CW; ++i) a[r][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < pr.groups; ++g) {
    const float* xg = x + g * kGroup;
    __m256 s[P][CW], z[P][CW];
    const uint8_t* c[P];
    for (int p = 0; p < P; ++p) {
      c[p] = pr.tile_codes(p, b, g) + c0 * 4;
      for (int i = 0; i < CW; ++i) {
        s[p][i] = _mm256_loadu_ps(pr.scales + pr.sz_offset(p, b, g) + c0 + 8 * i);
        z[p][i] = _mm256_loadu_ps(pr.zeros + pr.sz_offset(p, b, g) + c0 + 8 * i);
      }
    }
    for (int64_t t = 0; t < 4; ++t) {
      __m256i v[P][CW];
      for (int p = 0; p < P; ++p)
        for (int i = 0; i < CW; ++i)
          v[p][i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c[p] + (t * kBlockN + 8 * i) * 4));
      for (int kk = 0; kk < 8; ++kk) {
        __m256 w[CW];
        for (int i = 0; i < CW; ++i) {
          w[i] = _mm256_fmadd_ps(code_avx2(v[0][i], kShift[kk]), s[0][i], z[0][i]);
          if constexpr (P == 2) w[i] = _mm256_add_ps(w[i], _mm256_fmadd_ps(code_avx2(v[1][i], kShift[kk]), s[1][i], z[1][i]));
        }
        for (int r = 0; r < MR; ++r) {
          const __m256 xb = _mm256_broadcast_ss(xg + r * pr.k + 8 * t + kk);
          for (int i = 0; i < CW; ++i) a[r][i] = _mm256_fmadd_ps(xb, w[i], a[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < CW; ++i) _mm256_storeu_ps(acc + r * kBlockN + c0 + 8 * i, a[r][i]);
}

// The same with AVX2: passes of up to 4 rows x 16 channels.
template <int P>
__attribute__((target("avx2,fma"))) void passes_avx2(const Problem& pr, int64_t b, int64_t c0, int64_t width,
                                                     float* acc) {
  for (int64_t c = c0; c < c0 + width; c += 16) {
    for (int64_t r0 = 0; r0 < pr.m; r0 += kPassRows) {
      const float* x = pr.x + r0 * pr.k;
      float* a = acc + r0 * kBlockN;
      switch (std::min(kPassRows, pr.m - r0)) {
        case 1: pass_avx2<1, 2, P>(pr, b, c, x, a); break;
        case 2: pass_avx2<2, 2, P>(pr, b, c, x, a); break;
        case 3: pass_avx2<3, 2, P>(pr, b, c, x, a); break;
        default: pass_avx2<4, 2, P>(pr, b, c, x, a); break;
      }
    }
  }
}
#endif  // SPARKSERVE_X86

}  // namespace
