// Does AVX-512 BF16's VDPBF16PS compute what the exact int4 kernel must (issue 23, part 3)? The kernel's rule
// (kernels/cpu/int4_gemm.cpp): one fp32 accumulator per output, acc = fma(x[k], w[k], acc) in increasing k,
// with the canonical fp32 weight w (engine/quant.py). VDPBF16PS multiplies bf16 pairs into fp32 lanes; this
// probe checks, on random bf16 operands, which sequence of fp32 roundings it equals (odd element's fma then
// the even one's, the reverse, or the exact three-term sum rounded once) and how it treats a subnormal
// product. Whether the canonical weights are bf16 at all is the other half (docs/benchmarks.md).
//
//   g++ -O2 -mavx512f -mavx512bf16 -ffp-contract=off benchmarks/probes/dpbf16_rounding.cpp -o /tmp/dpbf16
//   /tmp/dpbf16 > bench_results/int4c_dpbf16_probe.json      (needs a CPU with avx512_bf16)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>

static float from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static uint16_t to_bf16(float f) {  // truncation: the returned value is exactly a bf16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u >> 16;
}

static __m512 dpbf16(const float* acc, const uint16_t* a, const uint16_t* b) {
  return _mm512_dpbf16_ps(_mm512_loadu_ps(acc), (__m512bh)_mm512_loadu_si512(a), (__m512bh)_mm512_loadu_si512(b));
}

int main() {
  std::string cpu = "unknown";
  std::ifstream info("/proc/cpuinfo");
  for (std::string line; std::getline(info, line);) {
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  }
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  long total = 0, odd_first = 0, even_first = 0, rounded_once = 0;
  for (int it = 0; it < 200000; ++it) {
    uint16_t a[32], b[32];
    float acc[16], out[16];
    for (int i = 0; i < 32; ++i) {
      a[i] = to_bf16(normal(gen));
      b[i] = to_bf16(normal(gen) * 0.01f);
    }
    for (float& v : acc) v = normal(gen);
    _mm512_storeu_ps(out, dpbf16(acc, a, b));
    for (int j = 0; j < 16; ++j) {
      const float x0 = from_bf16(a[2 * j]), w0 = from_bf16(b[2 * j]);
      const float x1 = from_bf16(a[2 * j + 1]), w1 = from_bf16(b[2 * j + 1]);
      odd_first += std::fma(x0, w0, std::fma(x1, w1, acc[j])) == out[j];
      even_first += std::fma(x1, w1, std::fma(x0, w0, acc[j])) == out[j];
      rounded_once += float(double(acc[j]) + double(x0) * w0 + double(x1) * w1) == out[j];
      ++total;
    }
  }
  uint16_t a[32] = {0}, b[32] = {0};
  float acc[16] = {0}, out[16];
  a[0] = to_bf16(1e-20f);
  b[0] = to_bf16(1e-20f);  // product ~1e-40: a subnormal fp32
  _mm512_storeu_ps(out, dpbf16(acc, a, b));
  std::printf("{\"cpu\": \"%s\", \"lanes\": %ld, \"equal_odd_then_even_fma\": %ld, \"equal_even_then_odd_fma\": %ld, "
              "\"equal_exact_sum_rounded_once\": %ld, \"subnormal_product\": {\"vdpbf16ps\": %g, \"fma\": %g}}\n",
              cpu.c_str(), total, odd_first, even_first, rounded_once, out[0],
              std::fma(from_bf16(a[0]), from_bf16(b[0]), 0.0f));
}
