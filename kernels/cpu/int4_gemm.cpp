// Weight-stationary int4 GEMM for the CPU: y[M, N] = x[M, K] @ w[N, K]^T with group-32 int4 weights.
//
// Weights (repacked once at load by kernels/int4_cpu.py: repack_int4; the int8-dot variant below reads the
// same layout) are tiles of BLOCK_N = 64 output channels x one group of 32 inputs; each plane p has
//   codes  uint8   [P, N / 64, K / 32, 4, 64, 4]: byte (t, c, b) holds the code of input 8 t + b (low
//                  nibble) and of input 8 t + 4 + b (high nibble) of channel c of the tile, so the 32-bit
//                  lane (t, c) holds the 8 codes of inputs 8 t .. 8 t + 7 (input 8 t + i at bit kShift[i]);
//   scales float32 [P, N / 64, K / 32, 64], zeros float32 [P, N / 64, K / 32, 64] (already rounded to the
//                  serving dtype).
// The weight value is engine/quant.py's canonical one: per plane fma(q - 8, scale, zero) rounded once to
// fp32, planes summed in fp32 (Q8_0 is two planes).
//
// Register passes (calls of at most direct_max_rows rows, at most two planes; AVX-512 up to 16 rows, 8 for
// two planes; AVX2 up to 2 rows): per pass of up to 4 rows and 16-64 channels (AVX-512: 5-8 rows over 32
// channels, exact_avx512.h), one 64-byte load brings 8 inputs x 16 channels of codes; each input's codes
// are a shift away (AVX-512: vpermps reads only the low 4 bits of an index, so a 16-entry table maps code q
// to q - 8 in one instruction), dequantised once into a register and applied to every row of the pass,
// the accumulators staying in registers over the whole K loop (weight-stationary; the idea of ggml's
// repacked q4_0_8x8 layout). The work per weight is then one fma to dequantise plus one per row: the
// kernel is bound by fma throughput (benchmarks/bench_int4.py). Larger calls (and the
// portable path) dequantise each tile and group once into an L1 buffer [32, 64] applied to every row.
// Each output element is ONE fp32 accumulator updated by fma in increasing k (k = 0 .. K - 1), starting
// from +0, on every code path (AVX-512, AVX2, portable; register or buffer). So a row's bits depend
// neither on M, nor on the other rows, nor on the thread count, nor on the ISA: the paths agree bit for
// bit with each other and with the pure-torch reference (kernels/int4_cpu.py: int4_mm_reference). Output:
// the fp32 sums rounded (to nearest even) to the output dtype (float32 or bfloat16).
//
// Threads: at::parallel_for (torch's own OpenMP team) over 32-channel half tiles on the register paths
// (a thread's range runs whole tiles where it holds both halves: 9 tiles split 4.5 / 4.5 on 2 cores),
// over 64-channel tiles on the buffer path. bf16 activations are widened to fp32 once per call, on the
// calling thread (exact).

#include "int4_gemm/common.h"
#include "int4_gemm/exact_avx2.h"
#include "int4_gemm/exact_avx512.h"
#include "int4_gemm/exact_portable.h"
#include "int4_gemm/int8_dot.h"

// The parts (kernels/cpu/int4_gemm/): common.h (constants, the Problem view, ISA selection, checks, the output
// store), exact_portable.h / exact_avx2.h / exact_avx512.h (the exact kernel per ISA), int8_dot.h (the int8-dot
// variant's kernels). This file: the drivers (register passes or L1 buffer, threading) and the torch ops.

namespace {

// Every row over channels [c0, c0 + width) of tile b on the register path of `isa` (AVX2 or AVX-512).
void register_unit(const Problem& pr, int64_t isa, int64_t b, int64_t c0, int64_t width, float* acc) {
#ifdef SPARKSERVE_X86
  if (isa == kAvx512) {
    pr.planes == 1 ? passes_avx512<1>(pr, b, c0, width, acc) : passes_avx512<2>(pr, b, c0, width, acc);
  } else {
    pr.planes == 1 ? passes_avx2<1>(pr, b, c0, width, acc) : passes_avx2<2>(pr, b, c0, width, acc);
  }
#endif
}

// Register paths: units of 32-channel half tiles; a thread runs a whole tile where it holds both halves.
template <typename OutT>
void run_registers(const Problem& pr, int64_t isa, OutT* out) {
  at::parallel_for(0, 2 * pr.num_tiles, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> acc(static_cast<size_t>(pr.m * kBlockN));
    for (int64_t u = u0; u < u1;) {
      const int64_t b = u / 2;
      const bool whole = u % 2 == 0 && u + 1 < u1;
      const int64_t c0 = whole ? 0 : (u % 2) * kHalfN, width = whole ? kBlockN : kHalfN;
      if (b * kBlockN + c0 < pr.n) {  // a half tile of padding only is skipped
        register_unit(pr, isa, b, c0, width, acc.data());
        store_rows(pr, b, acc.data(), out, c0, width);
      }
      u += whole ? 2 : 1;
    }
  });
}

// Register passes serve at most these many rows (and direct_max_rows); more take the buffer path. Measured
// with one thread: two planes (the LM head) at 16 rows 13.5 ms buffer vs 15.4 ms register passes; AVX2 (16
// ymm registers: passes of 16 channels) on 576 x 576, register vs buffer 30 / 39 us at 2 rows, 49 / 48 at 3,
// 67 / 55 at 4.
constexpr int64_t kTwoPlaneRegisterRows = 8;
constexpr int64_t kAvx2RegisterRows = 2;

template <typename OutT>
void run(const Problem& pr, int64_t isa, int64_t direct_max_rows, OutT* out) {
  const int64_t cap = isa == kAvx2 ? kAvx2RegisterRows : pr.planes == 1 ? direct_max_rows : kTwoPlaneRegisterRows;
  const int64_t register_rows = std::min(direct_max_rows, cap);
  if (isa != kPortable && pr.m <= register_rows && pr.planes <= 2) {
    run_registers(pr, isa, out);
    return;
  }
  at::parallel_for(0, pr.num_tiles, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float w[kGroup * kBlockN];
    std::vector<float> acc(static_cast<size_t>(pr.m * kBlockN));
    for (int64_t b = b0; b < b1; ++b) {
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
  check_tiles(x_in, codes, scales, zeros, n, out_dtype);
  isa = resolve_isa(isa, best_isa());
  TORCH_CHECK(isa_supported(isa), "instruction set ", isa, " is not supported by this CPU (0 portable, 1 AVX2, 2 AVX-512)");
  const at::Tensor x = x_in.contiguous();
  std::vector<float> widened;
  const Problem pr{float_rows(x, widened), codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(),
                   x.size(0), n, x.size(1), codes.size(0), codes.size(1), codes.size(2)};
  at::Tensor out = at::empty({pr.m, n}, x.options().dtype(out_dtype));
  if (pr.m == 0) return out;
  if (out_dtype == at::kFloat) {
    run(pr, isa, direct_max_rows, out.data_ptr<float>());
  } else {
    run(pr, isa, direct_max_rows, out.data_ptr<c10::BFloat16>());
  }
  return out;
}

template <typename OutT>
void run_q8(const ProblemQ8& pr, int64_t isa, OutT* out) {
  at::parallel_for(0, pr.num_tiles, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(static_cast<size_t>(pr.m * kBlockN));
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t g = 0; g < pr.groups; ++g) {
        for (int64_t p = 0; p < pr.planes; ++p) {
#ifdef SPARKSERVE_X86
          if (isa == kAvx512) {
            group_avx512_q8(pr, b, g, p, acc.data());
            continue;
          }
          if (isa == kAvx2) {
            group_avx2_q8(pr, b, g, p, acc.data());
            continue;
          }
#endif
          group_portable_q8(pr, b, g, p, acc.data());
        }
      }
      store_rows(pr, b, acc.data(), out);
    }
  });
}

at::Tensor int4_q8_mm(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t n, at::ScalarType out_dtype, int64_t isa) {
  check_tiles(x_in, codes, scales, zeros, n, out_dtype);
  const at::Tensor x_c = x_in.contiguous();
  std::vector<float> widened;
  const float* x = float_rows(x_c, widened);
  const int64_t planes = codes.size(0), num_tiles = codes.size(1), groups = codes.size(2);
  isa = resolve_isa(isa, q8_isa_supported(kAvx512) ? kAvx512 : q8_isa_supported(kAvx2) ? kAvx2 : kPortable);
  TORCH_CHECK(q8_isa_supported(isa), "instruction set ", isa,
              " is not supported by this CPU for the int8-dot kernel (0 portable, 1 AVX2, 2 AVX-512 VNNI)");
  const int64_t m = x_c.size(0), k = x_c.size(1);
  at::Tensor out = at::empty({m, n}, x_c.options().dtype(out_dtype));
  if (m == 0) return out;
  std::vector<int8_t> xq(static_cast<size_t>(m * k));
  std::vector<float> d(static_cast<size_t>(m * groups));
  std::vector<int32_t> sums(static_cast<size_t>(m * groups));
#ifdef SPARKSERVE_X86
  if (isa != kPortable) {
    quantize_rows_avx2(x, m, k, xq.data(), d.data(), sums.data());
  } else {
    quantize_rows(x, m, k, xq.data(), d.data(), sums.data());
  }
#else
  quantize_rows(x, m, k, xq.data(), d.data(), sums.data());
#endif
  const ProblemQ8 pr{xq.data(), d.data(), sums.data(), codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                     zeros.data_ptr<float>(), m, n, k, planes, num_tiles, groups};
  if (out_dtype == at::kFloat) {
    run_q8(pr, isa, out.data_ptr<float>());
  } else {
    run_q8(pr, isa, out.data_ptr<c10::BFloat16>());
  }
  return out;
}

int64_t q8_isa_flags() {
  int64_t flags = 0;
  for (int64_t isa : {kPortable, kAvx2, kAvx512}) {
    if (q8_isa_supported(isa)) flags |= int64_t{1} << isa;
  }
  return flags;
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
  m.def("int4_q8_mm(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int n, ScalarType out_dtype, int isa) -> Tensor");
  m.def("q8_isa_flags() -> int", &q8_isa_flags);
}

TORCH_LIBRARY_IMPL(sparkserve_int4, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int4_q8_mm", &int4_q8_mm);
}

// Inference kernels without a gradient: served at the autograd key too, so a call skips the boxed
// autograd-not-implemented fallback (an empty call 3.3 -> 3.15 us on the development machine).
TORCH_LIBRARY_IMPL(sparkserve_int4, Autograd, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int4_q8_mm", &int4_q8_mm);
}
