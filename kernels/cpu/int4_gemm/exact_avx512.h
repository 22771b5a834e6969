// The exact kernel with AVX-512F: the L1-buffer path and register passes of up to 4 rows x 64 channels.
// Part of the weight-stationary int4 GEMM (kernels/cpu/int4_gemm.cpp: the layout, the arithmetic and why
// every path computes the same bits). Included once, by int4_gemm.cpp: anonymous namespace.

#pragma once

#include "common.h"

namespace {

#ifdef SPARKSERVE_X86
// ----------------------------------------------------------------------------- AVX-512
__attribute__((target("avx512f"))) inline __m512 code_avx512(__m512i v, int shift) {
  // permutexvar reads the low 4 bits of each index: table[q] = q - 8 without masking
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  return _mm512_permutexvar_ps(_mm512_srli_epi32(v, shift), table);
}

__attribute__((target("avx512f"))) void dequant_avx512(const Problem& pr, int64_t b, int64_t g, float* w) {
  for (int64_t p = 0; p < pr.planes; ++p) {
    const uint8_t* c = pr.tile_codes(p, b, g);
    const float* s = pr.scales + pr.sz_offset(p, b, g);
    const float* z = pr.zeros + pr.sz_offset(p, b, g);
    for (int64_t c16 = 0; c16 < kBlockN; c16 += 16) {
      const __m512 sv = _mm512_loadu_ps(s + c16);
      const __m512 zv = _mm512_loadu_ps(z + c16);
      for (int64_t t = 0; t < 4; ++t) {
        const __m512i v = _mm512_loadu_si512(c + (t * kBlockN + c16) * 4);
        for (int i = 0; i < 8; ++i) {
          __m512 wv = _mm512_fmadd_ps(code_avx512(v, kShift[i]), sv, zv);
          float* wk = w + (8 * t + i) * kBlockN + c16;
          if (p > 0) wv = _mm512_add_ps(_mm512_load_ps(wk), wv);
          _mm512_store_ps(wk, wv);
        }
      }
    }
  }
}

// MR rows x 64 channels (4 zmm each) over one group.
template <int MR>
__attribute__((target("avx512f"))) inline void micro_avx512(const float* const* xr, const float* w, float* const* a) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_loadu_ps(a[r] + 16 * i);
  for (int kk = 0; kk < kGroup; ++kk) {
    const float* wk = w + kk * kBlockN;
    const __m512 w0 = _mm512_load_ps(wk), w1 = _mm512_load_ps(wk + 16);
    const __m512 w2 = _mm512_load_ps(wk + 32), w3 = _mm512_load_ps(wk + 48);
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(xr[r][kk]);
      acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(xb, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(xb, w3, acc[r][3]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(a[r] + 16 * i, acc[r][i]);
}

template <int MR>
__attribute__((target("avx512f"))) inline void rows_avx512(const Problem& pr, int64_t r, int64_t g, const float* w,
                                                            float* acc) {
  const float* xr[MR];
  float* a[MR];
  for (int i = 0; i < MR; ++i) {
    xr[i] = pr.x + (r + i) * pr.k + g * kGroup;
    a[i] = acc + (r + i) * kBlockN;
  }
  micro_avx512<MR>(xr, w, a);
}

__attribute__((target("avx512f"))) void accumulate_avx512(const Problem& pr, int64_t g, const float* w, float* acc) {
  int64_t r = 0;
  for (; r + 6 <= pr.m; r += 6) rows_avx512<6>(pr, r, g, w, acc);
  switch (pr.m - r) {
    case 5: rows_avx512<5>(pr, r, g, w, acc); break;
    case 4: rows_avx512<4>(pr, r, g, w, acc); break;
    case 3: rows_avx512<3>(pr, r, g, w, acc); break;
    case 2: rows_avx512<2>(pr, r, g, w, acc); break;
    case 1: rows_avx512<1>(pr, r, g, w, acc); break;
    default: break;
  }
}

// Register pass: MR rows (x: row 0 of the pass) x 16 CW channels from channel c0 of tile b, P planes,
// whole K; writes the fp32 sums to acc [MR, 64] at column c0. Per group the scales and zeros stay in
// registers; per 8 inputs one 64-byte load per 16 channels and plane brings the codes.
template <int MR, int CW, int P>
__attribute__((target("avx512f"))) void pass_avx512(const Problem& pr, int64_t b, int64_t c0, const float* x,
                                                    float* acc) {
  __m512 a[MR][CW];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < CW; ++i) a[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < pr.groups; ++g) {
    const float* xg = x + g * kGroup;
    __m512 s[P][CW], z[P][CW];
    const uint8_t* c[P];
    for (int p = 0; p < P; ++p) {
      c[p] = pr.tile_codes(p, b, g) + c0 * 4;
      for (int i = 0; i < CW; ++i) {
        s[p][i] = _mm512_loadu_ps(pr.scales + pr.sz_offset(p, b, g) + c0 + 16 * i);
        z[p][i] = _mm512_loadu_ps(pr.zeros + pr.sz_offset(p, b, g) + c0 + 16 * i);
      }
    }
    for (int64_t t = 0; t < 4; ++t) {
      __m512i v[P][CW];
      for (int p = 0; p < P; ++p)
        for (int i = 0; i < CW; ++i) v[p][i] = _mm512_loadu_si512(c[p] + (t * kBlockN + 16 * i) * 4);
#pragma GCC unroll 8
      for (int kk = 0; kk < 8; ++kk) {
        __m512 w[CW];
        for (int i = 0; i < CW; ++i) {
          w[i] = _mm512_fmadd_ps(code_avx512(v[0][i], kShift[kk]), s[0][i], z[0][i]);
          if constexpr (P == 2)
            w[i] = _mm512_add_ps(w[i], _mm512_fmadd_ps(code_avx512(v[1][i], kShift[kk]), s[1][i], z[1][i]));
        }
        for (int r = 0; r < MR; ++r) {
          const __m512 xb = _mm512_set1_ps(xg[r * pr.k + 8 * t + kk]);
          for (int i = 0; i < CW; ++i) a[r][i] = _mm512_fmadd_ps(xb, w[i], a[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < CW; ++i) _mm512_storeu_ps(acc + r * kBlockN + c0 + 16 * i, a[r][i]);
}

// Every row over channels [c0, c0 + width) of tile b (width 32 or 64), in register passes over groups of up
// to kWidePassRows rows: a group of at most 4 rows in one pass over 64 channels (4 zmm per row), a larger one
// in passes of all its rows over 32 channels (2 zmm per row: 8 rows hold 16 accumulators), so each weight is
// dequantised once per group of 8 rows rather than once per 4 (one fma per weight and row plus one per
// weight and group: 8 rows 9 fmas per weight instead of 10). The order of each output's fmas is unchanged.
template <int P>
__attribute__((target("avx512f"))) void passes_avx512(const Problem& pr, int64_t b, int64_t c0, int64_t width,
                                                      float* acc) {
  for (int64_t r0 = 0; r0 < pr.m; r0 += kWidePassRows) {
    const float* x = pr.x + r0 * pr.k;
    float* a = acc + r0 * kBlockN;
    const int64_t rows = std::min(kWidePassRows, pr.m - r0);
    if (rows <= kPassRows && width == kBlockN) {
      switch (rows) {
        case 1: pass_avx512<1, 4, P>(pr, b, c0, x, a); break;
        case 2: pass_avx512<2, 4, P>(pr, b, c0, x, a); break;
        case 3: pass_avx512<3, 4, P>(pr, b, c0, x, a); break;
        default: pass_avx512<4, 4, P>(pr, b, c0, x, a); break;
      }
      continue;
    }
    for (int64_t c = c0; c < c0 + width; c += kHalfN) {
      switch (rows) {
        case 1: pass_avx512<1, 2, P>(pr, b, c, x, a); break;
        case 2: pass_avx512<2, 2, P>(pr, b, c, x, a); break;
        case 3: pass_avx512<3, 2, P>(pr, b, c, x, a); break;
        case 4: pass_avx512<4, 2, P>(pr, b, c, x, a); break;
        case 5: pass_avx512<5, 2, P>(pr, b, c, x, a); break;
        case 6: pass_avx512<6, 2, P>(pr, b, c, x, a); break;
        case 7: pass_avx512<7, 2, P>(pr, b, c, x, a); break;
        default: pass_avx512<8, 2, P>(pr, b, c, x, a); break;
      }
    }
  }
}
#endif  // SPARKSERVE_X86

}  // namespace
