// Weight-stationary int4 GEMM for the CPU: y[M, N] = x[M, K] @ w[N, K]^T with group-32 int4 weights.
//
// Weights (repacked once at load by kernels/int4_cpu.py: repack_int4) are tiles of BLOCK_N = 64 output
// channels x one group of 32 inputs; each plane p has
//   codes  uint8   [P, N / 64, K / 32, 16, 64]: byte (j, c) holds the code of input 2 j (low nibble) and of
//                  input 2 j + 1 (high nibble) of channel c of the tile;
//   scales float32 [P, N / 64, K / 32, 64], zeros float32 [P, N / 64, K / 32, 64] (already rounded to the
//                  serving dtype).
// The weight value is engine/quant.py's canonical one: per plane fma(q - 8, scale, zero) rounded once to
// fp32, planes summed in fp32 (Q8_0 is two planes).
//
// Per tile and group the 32 x 64 weights are dequantised once into an L1 buffer and applied to every row
// (weight-stationary; the idea of ggml's repacked q4_0_8x8 layout). With AVX-512 and at most
// direct_max_rows rows they are instead dequantised into registers once per pass of 4 rows and applied
// at once, the accumulators staying in registers over the whole K loop (same arithmetic, fewer memory
// operations, the weights unpacked once per 4 rows; which is faster depends on the CPU:
// benchmarks/bench_int4.py measures both). Each output element is ONE fp32
// accumulator updated by fma in increasing k (k = 0 .. K - 1), starting from +0, on every code path
// (AVX-512, AVX2, portable). So a row's bits depend neither on M, nor on the other rows, nor on the
// thread count, nor on the ISA: the paths agree bit for bit with each other and with the pure-torch
// reference (kernels/int4_cpu.py: int4_mm_reference). Output: the fp32 sums rounded (to nearest even)
// to the output dtype (float32 or bfloat16).
//
// Threads: at::parallel_for over the 64-channel tiles (torch's own OpenMP team).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARKSERVE_X86 1
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kBlockN = 64;
constexpr int64_t kTileBytes = 16 * kBlockN;  // codes of one (plane, tile, group)

enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

struct Problem {
  const float* x;          // [M, K]
  const uint8_t* codes;    // [P, NB, G, 16, 64]
  const float* scales;     // [P, NB, G, 64]
  const float* zeros;      // [P, NB, G, 64]
  int64_t m, n, k, planes, num_tiles, groups;

  const uint8_t* tile_codes(int64_t p, int64_t b, int64_t g) const {
    return codes + ((p * num_tiles + b) * groups + g) * kTileBytes;
  }
  int64_t sz_offset(int64_t p, int64_t b, int64_t g) const { return ((p * num_tiles + b) * groups + g) * kBlockN; }
};

// ----------------------------------------------------------------------------- portable
void dequant_portable(const Problem& pr, int64_t b, int64_t g, float* w /* [32, 64] */) {
  for (int64_t p = 0; p < pr.planes; ++p) {
    const uint8_t* c = pr.tile_codes(p, b, g);
    const float* s = pr.scales + pr.sz_offset(p, b, g);
    const float* z = pr.zeros + pr.sz_offset(p, b, g);
    for (int64_t j = 0; j < 16; ++j) {
      for (int64_t ch = 0; ch < kBlockN; ++ch) {
        const uint8_t byte = c[j * kBlockN + ch];
        const float lo = std::fma(static_cast<float>(byte & 15) - 8.0f, s[ch], z[ch]);
        const float hi = std::fma(static_cast<float>(byte >> 4) - 8.0f, s[ch], z[ch]);
        float* w_lo = w + 2 * j * kBlockN + ch;
        float* w_hi = w + (2 * j + 1) * kBlockN + ch;
        *w_lo = p == 0 ? lo : *w_lo + lo;
        *w_hi = p == 0 ? hi : *w_hi + hi;
      }
    }
  }
}

void accumulate_portable(const Problem& pr, int64_t g, const float* w, float* acc /* [M, 64] */) {
  for (int64_t r = 0; r < pr.m; ++r) {
    const float* xr = pr.x + r * pr.k + g * kGroup;
    float* a = acc + r * kBlockN;
    for (int64_t kk = 0; kk < kGroup; ++kk) {
      for (int64_t ch = 0; ch < kBlockN; ++ch) a[ch] = std::fma(xr[kk], w[kk * kBlockN + ch], a[ch]);
    }
  }
}

#ifdef SPARKSERVE_X86
// ----------------------------------------------------------------------------- AVX2 + FMA
__attribute__((target("avx2,fma"))) void dequant_avx2(const Problem& pr, int64_t b, int64_t g, float* w) {
  const __m256i mask = _mm256_set1_epi32(15);
  const __m256i eight = _mm256_set1_epi32(8);
  for (int64_t p = 0; p < pr.planes; ++p) {
    const uint8_t* c = pr.tile_codes(p, b, g);
    const float* s = pr.scales + pr.sz_offset(p, b, g);
    const float* z = pr.zeros + pr.sz_offset(p, b, g);
    for (int64_t c8 = 0; c8 < kBlockN; c8 += 8) {
      const __m256 sv = _mm256_loadu_ps(s + c8);
      const __m256 zv = _mm256_loadu_ps(z + c8);
      for (int64_t j = 0; j < 16; ++j) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + j * kBlockN + c8)));
        const __m256 qlo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, mask), eight));
        const __m256 qhi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), eight));
        __m256 lo = _mm256_fmadd_ps(qlo, sv, zv);
        __m256 hi = _mm256_fmadd_ps(qhi, sv, zv);
        float* w_lo = w + 2 * j * kBlockN + c8;
        float* w_hi = w + (2 * j + 1) * kBlockN + c8;
        if (p > 0) {
          lo = _mm256_add_ps(_mm256_load_ps(w_lo), lo);
          hi = _mm256_add_ps(_mm256_load_ps(w_hi), hi);
        }
        _mm256_store_ps(w_lo, lo);
        _mm256_store_ps(w_hi, hi);
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

// ----------------------------------------------------------------------------- AVX-512
__attribute__((target("avx512f"))) void dequant_avx512(const Problem& pr, int64_t b, int64_t g, float* w) {
  // permutexvar reads the low 4 bits of each index: table[q] = q - 8 without masking
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t p = 0; p < pr.planes; ++p) {
    const uint8_t* c = pr.tile_codes(p, b, g);
    const float* s = pr.scales + pr.sz_offset(p, b, g);
    const float* z = pr.zeros + pr.sz_offset(p, b, g);
    for (int64_t c16 = 0; c16 < kBlockN; c16 += 16) {
      const __m512 sv = _mm512_loadu_ps(s + c16);
      const __m512 zv = _mm512_loadu_ps(z + c16);
      for (int64_t j = 0; j < 16; ++j) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j * kBlockN + c16)));
        __m512 lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, table), sv, zv);
        __m512 hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), sv, zv);
        float* w_lo = w + 2 * j * kBlockN + c16;
        float* w_hi = w + (2 * j + 1) * kBlockN + c16;
        if (p > 0) {
          lo = _mm512_add_ps(_mm512_load_ps(w_lo), lo);
          hi = _mm512_add_ps(_mm512_load_ps(w_hi), hi);
        }
        _mm512_store_ps(w_lo, lo);
        _mm512_store_ps(w_hi, hi);
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
constexpr int64_t kDirectRows = 4;  // rows per register pass

// MR <= kDirectRows rows x one 64-channel tile over the whole K, P planes: weights dequantised into
// registers (k = 2 j and 2 j + 1 of each byte row, in increasing k), accumulators kept in registers.
template <int MR, int P>
__attribute__((target("avx512f"))) void direct_avx512(const Problem& pr, int64_t b, const float* x, float* acc) {
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 a[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < pr.groups; ++g) {
    const float* xg = x + g * kGroup;
    const uint8_t* codes[P];
    const float* sp[P];
    const float* zp[P];
    for (int p = 0; p < P; ++p) {
      codes[p] = pr.tile_codes(p, b, g);
      sp[p] = pr.scales + pr.sz_offset(p, b, g);
      zp[p] = pr.zeros + pr.sz_offset(p, b, g);
    }
    for (int64_t j = 0; j < 16; ++j) {
      __m512 x0[MR], x1[MR];
      for (int r = 0; r < MR; ++r) {
        x0[r] = _mm512_set1_ps(xg[r * pr.k + 2 * j]);
        x1[r] = _mm512_set1_ps(xg[r * pr.k + 2 * j + 1]);
      }
      for (int i = 0; i < 4; ++i) {
        __m512 lo, hi;
        for (int p = 0; p < P; ++p) {
          const __m512 sv = _mm512_loadu_ps(sp[p] + 16 * i);
          const __m512 zv = _mm512_loadu_ps(zp[p] + 16 * i);
          const __m512i v = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes[p] + j * kBlockN + 16 * i)));
          const __m512 plo = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, table), sv, zv);
          const __m512 phi = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), sv, zv);
          lo = p == 0 ? plo : _mm512_add_ps(lo, plo);
          hi = p == 0 ? phi : _mm512_add_ps(hi, phi);
        }
        for (int r = 0; r < MR; ++r) {
          a[r][i] = _mm512_fmadd_ps(x0[r], lo, a[r][i]);
          a[r][i] = _mm512_fmadd_ps(x1[r], hi, a[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(acc + r * kBlockN + 16 * i, a[r][i]);
}

template <int P>
__attribute__((target("avx512f"))) void direct_pass(const Problem& pr, int64_t b, int64_t r0, int64_t rows, float* acc) {
  const float* x = pr.x + r0 * pr.k;
  float* a = acc + r0 * kBlockN;
  switch (rows) {
    case 1: direct_avx512<1, P>(pr, b, x, a); break;
    case 2: direct_avx512<2, P>(pr, b, x, a); break;
    case 3: direct_avx512<3, P>(pr, b, x, a); break;
    default: direct_avx512<4, P>(pr, b, x, a); break;
  }
}

// Register passes of up to kDirectRows rows (the weights are dequantised once per pass); false where
// the L1-buffer path serves (more than direct_max_rows rows, or more than two planes).
__attribute__((target("avx512f"))) bool try_direct_avx512(const Problem& pr, int64_t b, float* acc,
                                                          int64_t direct_max_rows) {
  if (pr.m > direct_max_rows || pr.planes > 2) return false;
  for (int64_t r0 = 0; r0 < pr.m; r0 += kDirectRows) {
    const int64_t rows = std::min(kDirectRows, pr.m - r0);
    if (pr.planes == 1) {
      direct_pass<1>(pr, b, r0, rows, acc);
    } else {
      direct_pass<2>(pr, b, r0, rows, acc);
    }
  }
  return true;
}
#endif  // SPARKSERVE_X86

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

template <typename OutT>
void store_rows(const Problem& pr, int64_t b, const float* acc, OutT* out) {
  const int64_t n0 = b * kBlockN;
  const int64_t width = std::min(kBlockN, pr.n - n0);
  for (int64_t r = 0; r < pr.m; ++r) {
    for (int64_t ch = 0; ch < width; ++ch) out[r * pr.n + n0 + ch] = static_cast<OutT>(acc[r * kBlockN + ch]);
  }
}

template <typename OutT>
void run(const Problem& pr, int64_t isa, int64_t direct_max_rows, OutT* out) {
  at::parallel_for(0, pr.num_tiles, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float w[kGroup * kBlockN];
    std::vector<float> acc(static_cast<size_t>(pr.m * kBlockN));
    for (int64_t b = b0; b < b1; ++b) {
#ifdef SPARKSERVE_X86
      if (isa == kAvx512 && try_direct_avx512(pr, b, acc.data(), direct_max_rows)) {
        store_rows(pr, b, acc.data(), out);
        continue;
      }
#endif
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t g = 0; g < pr.groups; ++g) {
#ifdef SPARKSERVE_X86
        if (isa == kAvx512) {
          dequant_avx512(pr, b, g, w);
          accumulate_avx512(pr, g, w, acc.data());
          continue;
        }
        if (isa == kAvx2) {
          dequant_avx2(pr, b, g, w);
          accumulate_avx2(pr, g, w, acc.data());
          continue;
        }
#endif
        dequant_portable(pr, b, g, w);
        accumulate_portable(pr, g, w, acc.data());
      }
      store_rows(pr, b, acc.data(), out);
    }
  });
}

at::Tensor int4_mm(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t n, at::ScalarType out_dtype, int64_t isa, int64_t direct_max_rows) {
  TORCH_CHECK(x_in.dim() == 2 && (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "x must be float32 or bfloat16 [M, K]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();  // exact for bf16
  TORCH_CHECK(codes.dim() == 5 && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(3) == 16 &&
                  codes.size(4) == kBlockN,
              "codes must be contiguous uint8 [P, N / 64, K / 32, 16, 64]");
  const int64_t planes = codes.size(0), num_tiles = codes.size(1), groups = codes.size(2);
  for (const at::Tensor* t : {&scales, &zeros}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->sizes() == at::IntArrayRef({planes, num_tiles, groups, kBlockN}),
                "scales / zeros must be contiguous float32 [P, N / 64, K / 32, 64]");
  }
  TORCH_CHECK(x.size(1) == groups * kGroup, "x has K = ", x.size(1), ", the weight ", groups * kGroup);
  TORCH_CHECK(n > (num_tiles - 1) * kBlockN && n <= num_tiles * kBlockN, "n = ", n, " does not fit ", num_tiles, " tiles");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, "out_dtype must be float32 or bfloat16");
  TORCH_CHECK(isa_supported(isa), "instruction set ", isa, " is not supported by this CPU (0 portable, 1 AVX2, 2 AVX-512)");
  const Problem pr{x.data_ptr<float>(), codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(),
                   x.size(0), n, x.size(1), planes, num_tiles, groups};
  at::Tensor out = at::empty({pr.m, n}, x.options().dtype(out_dtype));
  if (pr.m == 0) return out;
  if (out_dtype == at::kFloat) {
    run(pr, isa, direct_max_rows, out.data_ptr<float>());
  } else {
    run(pr, isa, direct_max_rows, out.data_ptr<c10::BFloat16>());
  }
  return out;
}

int64_t isa_flags() {
  int64_t flags = 0;
  for (int64_t isa : {kPortable, kAvx2, kAvx512}) {
    if (isa_supported(isa)) flags |= int64_t{1} << isa;
  }
  return flags;
}

}  // namespace

TORCH_LIBRARY(sparkserve_int4, m) {
  m.def("int4_mm(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int n, ScalarType out_dtype, int isa, "
        "int direct_max_rows) -> Tensor");
  m.def("isa_flags() -> int", &isa_flags);
  m.def("best_isa() -> int", &best_isa);
}

TORCH_LIBRARY_IMPL(sparkserve_int4, CPU, m) { m.impl("int4_mm", &int4_mm); }
