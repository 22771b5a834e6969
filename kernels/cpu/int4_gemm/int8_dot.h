// The int8-dot variant (lossy, opt-in): activation quantisation and the per-group integer dot products on every path.
// Part of the weight-stationary int4 GEMM (kernels/cpu/int4_gemm.cpp: the layout, the arithmetic and why
// every path computes the same bits). Included once, by int4_gemm.cpp: anonymous namespace.

#pragma once

#include "common.h"

namespace {

// ============================================================================= int8-dot variant
// y[M, N] = x[M, K] @ w[N, K]^T with the activations quantised to int8 per row and group of 32 (the
// q4 x q8 dot product of ggml's q4_0 / q4_1 x q8_0 kernels; our own code): for row r and group g,
// d = max|x| / 127 (fp32), xq = round-half-even(x / d) in -127..127 (0 when d = 0) and S = sum(xq).
// Per plane, channel c: D = sum_k q[c, k] xq[k] over the group (int32, exact: u8 x s8 products by
// VNNI vpdpbusd / AVX2 maddubs + madd / scalar), then in fp32
//   v = fma(scale[c], float(D - 8 S), zero[c] * float(S))     (= sum_k (q - 8) scale + zero, times xq)
//   acc = fma(d, v, acc)                                       (groups in increasing k, planes in order)
// starting from +0, then rounded to the output dtype. Integer parts are exact and the fp32 operations
// are the same IEEE operations in the same order on every path, so the AVX-512 VNNI, AVX2 and portable
// paths agree bit for bit, and a row's bits depend neither on M nor on the other rows (batch-invariant).
// Lossy against the exact kernel (exact_*.h): x is rounded to 8 bits per group (relative error <= 1/254 of the
// group's max). Codes: uint8 [P, N / 64, K / 32, 4, 64, 4]: byte (t, c, b) holds the code of input
// 8 t + b (low nibble) and of input 8 t + 4 + b (high nibble) of channel c (kernels/int4_cpu.py:
// repack_int4_q8); scales / zeros as above.

struct ProblemQ8 {
  const int8_t* xq;     // [M, K]
  const float* d;       // [M, G] activation scales
  const int32_t* sums;  // [M, G] sum of xq per group
  const uint8_t* codes;
  const float* scales;
  const float* zeros;
  int64_t m, n, k, planes, num_tiles, groups;

  const uint8_t* tile_codes(int64_t p, int64_t b, int64_t g) const {
    return codes + ((p * num_tiles + b) * groups + g) * kTileBytes;
  }
  int64_t sz_offset(int64_t p, int64_t b, int64_t g) const { return ((p * num_tiles + b) * groups + g) * kBlockN; }
};

bool q8_isa_supported(int64_t isa) {
  if (isa == kPortable) return true;
#ifdef SPARKSERVE_X86
  if (isa == kAvx2) return __builtin_cpu_supports("avx2");
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
#endif
  return false;
}

// One row's activation quantisation (shared by every path: identical xq, d, sums).
void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* xq, float* d, int32_t* sums) {
  const int64_t groups = k / kGroup;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + r * k + g * kGroup;
      float amax = 0.0f;
      for (int64_t i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(xg[i]));
      const float dg = amax / 127.0f;
      int32_t sum = 0;
      for (int64_t i = 0; i < kGroup; ++i) {
        const float q = dg == 0.0f ? 0.0f : std::nearbyint(xg[i] / dg);
        const int8_t v = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
        xq[r * k + g * kGroup + i] = v;
        sum += v;
      }
      d[r * groups + g] = dg;
      sums[r * groups + g] = sum;
    }
  }
}

#ifdef SPARKSERVE_X86
// quantize_rows with AVX2: the same IEEE operations (max of |x|, one correctly rounded division per element,
// round half to even), so the same xq, d and sums.
__attribute__((target("avx2,fma"))) void quantize_rows_avx2(const float* x, int64_t m, int64_t k, int8_t* xq, float* d,
                                                            int32_t* sums) {
  const int64_t groups = k / kGroup;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 lim = _mm256_set1_ps(127.0f);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + r * k + g * kGroup;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xg + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
      const float dg = _mm_cvtss_f32(h) / 127.0f;
      int32_t sum = 0;
      int8_t* out = xq + r * k + g * kGroup;
      if (dg == 0.0f) {
        std::memset(out, 0, kGroup);
      } else {
        const __m256 dv = _mm256_set1_ps(dg);
        for (int i = 0; i < 4; ++i) {
          __m256 q = _mm256_round_ps(_mm256_div_ps(v[i], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          q = _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), lim), _mm256_min_ps(lim, q));
          alignas(32) int32_t qi[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(qi), _mm256_cvtps_epi32(q));
          for (int j = 0; j < 8; ++j) {
            out[8 * i + j] = static_cast<int8_t>(qi[j]);
            sum += qi[j];
          }
        }
      }
      d[r * groups + g] = dg;
      sums[r * groups + g] = sum;
    }
  }
}
#endif  // SPARKSERVE_X86

// acc[64] += the group's contribution of one plane for one row, from the int32 dots D[64] (scalar form of
// the vector epilogues below: the same IEEE operations).
inline void epilogue_scalar(const int32_t* dot, int32_t sum, float d, const float* s, const float* z, float* acc) {
  const float sf = static_cast<float>(sum);
  for (int64_t ch = 0; ch < kBlockN; ++ch) {
    const float v = std::fma(s[ch], static_cast<float>(dot[ch] - 8 * sum), z[ch] * sf);
    acc[ch] = std::fma(d, v, acc[ch]);
  }
}

void group_portable_q8(const ProblemQ8& pr, int64_t b, int64_t g, int64_t p, float* acc) {
  const uint8_t* c = pr.tile_codes(p, b, g);
  const float* s = pr.scales + pr.sz_offset(p, b, g);
  const float* z = pr.zeros + pr.sz_offset(p, b, g);
  for (int64_t r = 0; r < pr.m; ++r) {
    const int8_t* xg = pr.xq + r * pr.k + g * kGroup;
    int32_t dot[kBlockN] = {0};
    for (int64_t t = 0; t < 4; ++t) {
      for (int64_t ch = 0; ch < kBlockN; ++ch) {
        for (int64_t i = 0; i < 4; ++i) {
          const uint8_t byte = c[(t * kBlockN + ch) * 4 + i];
          dot[ch] += (byte & 15) * xg[8 * t + i] + (byte >> 4) * xg[8 * t + 4 + i];
        }
      }
    }
    epilogue_scalar(dot, pr.sums[r * pr.groups + g], pr.d[r * pr.groups + g], s, z, acc + r * kBlockN);
  }
}

#ifdef SPARKSERVE_X86
inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// MR rows x 32 channels (offset half) of one group and plane: maddubs + madd, then the fp32 epilogue.
template <int MR>
__attribute__((target("avx2,fma"))) void rows_avx2_q8(const ProblemQ8& pr, int64_t b, int64_t g, int64_t p, int64_t r0,
                                                      int64_t half, float* acc) {
  const uint8_t* c = pr.tile_codes(p, b, g);
  const __m256i mask = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i dot[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) dot[r][i] = _mm256_setzero_si256();
  for (int64_t t = 0; t < 4; ++t) {
    __m256i lo[4], hi[4];
    for (int i = 0; i < 4; ++i) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + (t * kBlockN + half + 8 * i) * 4));
      lo[i] = _mm256_and_si256(v, mask);
      hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    }
    for (int r = 0; r < MR; ++r) {
      const int8_t* xg = pr.xq + (r0 + r) * pr.k + g * kGroup + 8 * t;
      const __m256i xlo = _mm256_set1_epi32(load4(xg));
      const __m256i xhi = _mm256_set1_epi32(load4(xg + 4));
      for (int i = 0; i < 4; ++i) {
        const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo[i], xlo), ones);
        const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi[i], xhi), ones);
        dot[r][i] = _mm256_add_epi32(dot[r][i], _mm256_add_epi32(pl, ph));
      }
    }
  }
  const float* s = pr.scales + pr.sz_offset(p, b, g) + half;
  const float* z = pr.zeros + pr.sz_offset(p, b, g) + half;
  for (int r = 0; r < MR; ++r) {
    const int64_t rg = (r0 + r) * pr.groups + g;
    const __m256i sum8 = _mm256_set1_epi32(8 * pr.sums[rg]);
    const __m256 sf = _mm256_set1_ps(static_cast<float>(pr.sums[rg]));
    const __m256 dv = _mm256_set1_ps(pr.d[rg]);
    float* a = acc + (r0 + r) * kBlockN + half;
    for (int i = 0; i < 4; ++i) {
      const __m256 tv = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot[r][i], sum8));
      const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(s + 8 * i), tv, _mm256_mul_ps(_mm256_loadu_ps(z + 8 * i), sf));
      _mm256_storeu_ps(a + 8 * i, _mm256_fmadd_ps(dv, v, _mm256_loadu_ps(a + 8 * i)));
    }
  }
}

__attribute__((target("avx2,fma"))) void group_avx2_q8(const ProblemQ8& pr, int64_t b, int64_t g, int64_t p, float* acc) {
  for (int64_t half = 0; half < kBlockN; half += 32) {
    int64_t r = 0;
    for (; r + 2 <= pr.m; r += 2) rows_avx2_q8<2>(pr, b, g, p, r, half, acc);
    if (r < pr.m) rows_avx2_q8<1>(pr, b, g, p, r, half, acc);
  }
}

// MR rows x 64 channels of one group and plane: vpdpbusd, then the fp32 epilogue.
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_avx512_q8(const ProblemQ8& pr, int64_t b, int64_t g,
                                                                           int64_t p, int64_t r0, float* acc) {
  const uint8_t* c = pr.tile_codes(p, b, g);
  const __m512i mask = _mm512_set1_epi8(15);
  __m512i dot[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) dot[r][i] = _mm512_setzero_si512();
  for (int64_t t = 0; t < 4; ++t) {
    __m512i lo[4], hi[4];
    for (int i = 0; i < 4; ++i) {
      const __m512i v = _mm512_loadu_si512(c + (t * kBlockN + 16 * i) * 4);
      lo[i] = _mm512_and_si512(v, mask);
      hi[i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    }
    for (int r = 0; r < MR; ++r) {
      const int8_t* xg = pr.xq + (r0 + r) * pr.k + g * kGroup + 8 * t;
      const __m512i xlo = _mm512_set1_epi32(load4(xg));
      const __m512i xhi = _mm512_set1_epi32(load4(xg + 4));
      for (int i = 0; i < 4; ++i) {
        dot[r][i] = _mm512_dpbusd_epi32(dot[r][i], lo[i], xlo);
        dot[r][i] = _mm512_dpbusd_epi32(dot[r][i], hi[i], xhi);
      }
    }
  }
  const float* s = pr.scales + pr.sz_offset(p, b, g);
  const float* z = pr.zeros + pr.sz_offset(p, b, g);
  for (int r = 0; r < MR; ++r) {
    const int64_t rg = (r0 + r) * pr.groups + g;
    const __m512i sum8 = _mm512_set1_epi32(8 * pr.sums[rg]);
    const __m512 sf = _mm512_set1_ps(static_cast<float>(pr.sums[rg]));
    const __m512 dv = _mm512_set1_ps(pr.d[rg]);
    float* a = acc + (r0 + r) * kBlockN;
    for (int i = 0; i < 4; ++i) {
      const __m512 tv = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[r][i], sum8));
      const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(s + 16 * i), tv, _mm512_mul_ps(_mm512_loadu_ps(z + 16 * i), sf));
      _mm512_storeu_ps(a + 16 * i, _mm512_fmadd_ps(dv, v, _mm512_loadu_ps(a + 16 * i)));
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void group_avx512_q8(const ProblemQ8& pr, int64_t b, int64_t g,
                                                                            int64_t p, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= pr.m; r += 4) rows_avx512_q8<4>(pr, b, g, p, r, acc);
  switch (pr.m - r) {
    case 3: rows_avx512_q8<3>(pr, b, g, p, r, acc); break;
    case 2: rows_avx512_q8<2>(pr, b, g, p, r, acc); break;
    case 1: rows_avx512_q8<1>(pr, b, g, p, r, acc); break;
    default: break;
  }
}
#endif  // SPARKSERVE_X86

}  // namespace
