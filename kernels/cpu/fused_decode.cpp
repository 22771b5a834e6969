// Fused CPU ops of a decoder layer's small steps (decode, verify blocks): everything between the linears.
//
// Eager torch runs ~25 small ops per layer around the four linears (norms, residual adds, RoPE, KV store,
// the padded batched attention, SiLU * up); at one row each costs more in dispatch than in arithmetic.
// These three ops replace them (engine/models/llama.py: DecoderLayer.forward_fused):
//   add_rms_norm       x' = x + delta (optional), h = weight * rms_norm(x')
//   silu_mul           [T, 2I] gate | up -> silu(gate) * up
//   rope_store_attend  q/k norm (optional), rotate-half RoPE on q and k, k / v stored into the paged KV
//                      cache at their slots, then causal attention of every query row over its sequence's
//                      cached keys 0 .. position (GQA: query head h reads KV head h / (H / Hkv)).
// Numerics follow the eager ops (engine/models/llama.py, engine/attention.py): every intermediate the eager
// path rounds to the model dtype (bf16) is rounded here at the same point (round to nearest even); norms,
// softmax and every dot product accumulate in fp32. Only the order of the fp32 sums (and exp's last ulp)
// may differ from ATen's vectorised kernels, so the outputs agree to fp32 rounding, not bit for bit.
// Softmax: max-subtracted exp, scaled by the reciprocal of the sum (ATen's CPU softmax); exp is exp_ps below
// (Cephes' expf polynomial, within 2 ulp of std::exp), so the loops around it vectorise.
// Threads: at::parallel_for (torch's OpenMP team) over tokens and over (query row, KV head) pairs.
// The hot loops (one function per row / token / query group) are compiled for AVX-512, AVX2 and the baseline
// and picked per call (fused_isa: the widest the CPU has, or SPARKSERVE_FUSED_ISA); bf16 rounding and exp are
// branch-free arithmetic, and without FMA contraction the three give the same bits (built with
// -fno-trapping-math, kernels/fused_cpu.py: the selects of exp_ps and round_bf16 if-convert).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARKSERVE_X86 1
#endif
#define SPARKSERVE_INLINE inline __attribute__((always_inline))

// The code path of the hot loops: each is compiled three times (AVX-512, AVX2, the baseline ISA) and picked per
// call: SPARKSERVE_FUSED_ISA=avx512|avx2|baseline forces one (an error when the CPU lacks it), else the widest
// the CPU has. Without FMA contraction and with branch-free rounding and exp the three give the same bits.
enum class Isa { kBaseline, kAvx2, kAvx512 };

bool isa_supported(Isa isa) {
#ifdef SPARKSERVE_X86
  if (isa == Isa::kAvx512) return __builtin_cpu_supports("avx512f");
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2");
  return true;
#else
  return isa == Isa::kBaseline;
#endif
}

Isa fused_isa() {  // read per call (getenv is cheap), so a test can switch paths within one process
  const char* forced = std::getenv("SPARKSERVE_FUSED_ISA");
  if (forced == nullptr || *forced == '\0') {
    for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
      if (isa_supported(isa)) return isa;
    return Isa::kBaseline;
  }
  const char* names[] = {"baseline", "avx2", "avx512"};
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(forced, names[i]) == 0) {
      TORCH_CHECK(isa_supported(static_cast<Isa>(i)), "SPARKSERVE_FUSED_ISA=", forced, ": this CPU lacks it");
      return static_cast<Isa>(i);
    }
  }
  TORCH_CHECK(false, "SPARKSERVE_FUSED_ISA must be one of avx512, avx2, baseline, got ", forced);
}

// Defines name<T>(isa, args...): name##_body<T> (SPARKSERVE_INLINE, like every helper it calls) inlined into
// one function per ISA (GCC's target attribute), chosen by isa.
#ifdef SPARKSERVE_X86
#define SPARKSERVE_ISA_VARIANTS(name, PARAMS, ARGS)                                                          \
  template <typename T>                                                                                      \
  __attribute__((target("avx512f"))) void name##_avx512 PARAMS { name##_body<T> ARGS; }                       \
  template <typename T>                                                                                      \
  __attribute__((target("avx2"))) void name##_avx2 PARAMS { name##_body<T> ARGS; }                            \
  template <typename T>                                                                                      \
  void name##_baseline PARAMS { name##_body<T> ARGS; }                                                       \
  template <typename T, typename... A>                                                                       \
  void name(Isa isa, A&&... args) {                                                                          \
    if (isa == Isa::kAvx512) name##_avx512<T>(std::forward<A>(args)...);                                     \
    else if (isa == Isa::kAvx2) name##_avx2<T>(std::forward<A>(args)...);                                    \
    else name##_baseline<T>(std::forward<A>(args)...);                                                       \
  }
#else
#define SPARKSERVE_ISA_VARIANTS(name, PARAMS, ARGS)                                                          \
  template <typename T, typename... A>                                                                       \
  void name(Isa, A&&... args) { name##_body<T>(std::forward<A>(args)...); }
#endif

// fp32 <-> bits without aliasing (the compiler vectorises these: no branch, no call).
SPARKSERVE_INLINE uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

SPARKSERVE_INLINE float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// Round an fp32 to bf16 (nearest, ties to even; NaN -> 0x7FC0) and widen back: c10::BFloat16's rounding,
// written branch-free so the loops around it vectorise.
SPARKSERVE_INLINE float round_bf16(float x) {
  const uint32_t u = bits_of(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return float_of(x != x ? 0x7FC00000u : rounded);
}

template <typename T>
SPARKSERVE_INLINE float rd(float x) {  // round to the model dtype and back (identity for fp32)
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, c10::BFloat16>) return round_bf16(x);
  else return static_cast<float>(static_cast<T>(x));
}

template <typename T>
SPARKSERVE_INLINE float widen(T x) {  // a dtype value as fp32 (bf16: its bits shifted up)
  if constexpr (std::is_same_v<T, c10::BFloat16>) return float_of(static_cast<uint32_t>(x.x) << 16);
  else return static_cast<float>(x);
}

template <typename T>
SPARKSERVE_INLINE T narrow(float x) {  // x already holds a dtype value (rd<T>): store it exactly
  if constexpr (std::is_same_v<T, c10::BFloat16>) return c10::BFloat16(static_cast<uint16_t>(bits_of(x) >> 16), c10::BFloat16::from_bits());
  else return static_cast<T>(x);
}

// e^x in fp32 without a call, so loops of it vectorise (Cephes' expf: Cody-Waite reduction by ln 2 and a degree-6
// polynomial, relative error ~1e-7, within 2 ulp of std::exp); 0 below -87.3, inf above 88.7, NaN kept. Plain
// multiplies and adds (no contraction): every ISA clone gives the same bits.
SPARKSERVE_INLINE float exp_ps(float x) {
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * (r * r) + r) + 1.0f;
  const float n1 = std::floor(n * 0.5f);  // 2^n as 2^n1 * 2^(n - n1): both normal for n in [-126, 128]
  const float lo = std::max(n1, -126.0f), hi = std::min(n - n1, 127.0f);
  const float e = (y * float_of(static_cast<uint32_t>(static_cast<int32_t>(lo) + 127) << 23)) *
                  float_of(static_cast<uint32_t>(static_cast<int32_t>(hi) + 127) << 23);
  return x < -87.3f ? 0.0f : (x > 88.7f ? INFINITY : (x != x ? x : e));
}

SPARKSERVE_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // eight independent sums: the compiler vectorises them
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// h = w * rd(x * rsqrt(mean(x^2) + eps)) with x in fp32 (x already holds dtype values); n elements.
template <typename T>
SPARKSERVE_INLINE void rms_norm_row(const float* x, const T* w, float eps, int64_t n, float* out) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j] * x[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += x[i] * x[i];
  const float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t k = 0; k < n; ++k) out[k] = rd<T>(widen(w[k]) * rd<T>(x[k] * inv));
}

// Rows [begin, end) of add_rms_norm: x_out = rd(x + delta), h = rms_norm(x_out); row, normed: [n] scratch.
template <typename T>
SPARKSERVE_INLINE void add_rms_norm_rows_body(const T* xp, const T* dp, const T* wp, float eps, int64_t n, int64_t begin,
                                         int64_t end, T* xo, T* hp, float* row, float* normed) {
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t k = 0; k < n; ++k) {
      const float v = widen(xp[r * n + k]);
      row[k] = dp == nullptr ? v : rd<T>(v + widen(dp[r * n + k]));
    }
    for (int64_t k = 0; k < n; ++k) xo[r * n + k] = narrow<T>(row[k]);
    rms_norm_row<T>(row, wp, eps, n, normed);
    for (int64_t k = 0; k < n; ++k) hp[r * n + k] = narrow<T>(normed[k]);
  }
}
SPARKSERVE_ISA_VARIANTS(add_rms_norm_rows,
                        (const T* xp, const T* dp, const T* wp, float eps, int64_t n, int64_t begin, int64_t end, T* xo, T* hp, float* row, float* normed),
                        (xp, dp, wp, eps, n, begin, end, xo, hp, row, normed))

template <typename T>
void add_rms_norm_impl(const at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                       float eps, at::Tensor& x_out, at::Tensor& h) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* dp = delta.has_value() ? delta->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* xo = x_out.data_ptr<T>();
  T* hp = h.data_ptr<T>();
  const Isa isa = fused_isa();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n), normed(n);
    add_rms_norm_rows<T>(isa, xp, dp, wp, eps, n, begin, end, xo, hp, row.data(), normed.data());
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D CPU tensor");
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "weight must be [d] in x's dtype");
  if (delta.has_value()) {
    check_rows(*delta, "delta");
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->scalar_type() == x.scalar_type(), "delta must match x");
  }
  at::Tensor x_out = at::empty_like(x);  // a copy of x without delta (outputs never alias inputs)
  at::Tensor h = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_impl<scalar_t>(x, delta, weight, static_cast<float>(eps), x_out, h);
  });
  return {x_out, h};
}

// Rows [begin, end) of silu_mul: out = rd(silu(gate)) * up, rounded; inter = I.
template <typename T>
SPARKSERVE_INLINE void silu_mul_rows_body(const T* gp, int64_t inter, int64_t begin, int64_t end, T* op) {
  for (int64_t r = begin; r < end; ++r) {
    const T* g = gp + r * 2 * inter;
    const T* u = g + inter;
    for (int64_t k = 0; k < inter; ++k) {
      const float x = widen(g[k]);
      const float act = rd<T>(x / (1.0f + exp_ps(-x)));
      op[r * inter + k] = narrow<T>(rd<T>(act * widen(u[k])));
    }
  }
}
SPARKSERVE_ISA_VARIANTS(silu_mul_rows,
                        (const T* gp, int64_t inter, int64_t begin, int64_t end, T* op),
                        (gp, inter, begin, end, op))

template <typename T>
void silu_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), inter = out.size(1);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const Isa isa = fused_isa();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) { silu_mul_rows<T>(isa, gp, inter, begin, end, op); });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up's width must be even (gate | up)");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul",
                                  [&] { silu_mul_impl<scalar_t>(gate_up, out); });
  return out;
}

struct AttendArgs {
  int64_t num_tokens, num_heads, num_kv_heads, head_dim, block_size, cache_head_stride;
  int64_t num_seqs, q_max, max_blocks;
  float eps, scale;
  Isa isa;
};

// One head's vector from qkv (already dtype values) -> optional norm -> RoPE, into out (fp32 holding dtype values).
template <typename T>
SPARKSERVE_INLINE void rope_head(const T* src, const T* norm_w, const T* cos, const T* sin, const AttendArgs& a, float* tmp,
                      float* out) {
  const int64_t hd = a.head_dim, half = hd / 2;
  for (int64_t d = 0; d < hd; ++d) tmp[d] = widen(src[d]);
  if (norm_w != nullptr) rms_norm_row<T>(tmp, norm_w, a.eps, hd, tmp);
  for (int64_t d = 0; d < half; ++d) {
    const float x1 = tmp[d], x2 = tmp[d + half];
    const float c = widen(cos[d]), s = widen(sin[d]);
    out[d] = rd<T>(rd<T>(x1 * c) - rd<T>(x2 * s));
    out[d + half] = rd<T>(rd<T>(x2 * c) + rd<T>(x1 * s));
  }
}

// Token t's q heads rotated into q_rot [H, hd]; its k heads rotated and its v heads stored at the token's slot.
template <typename T>
SPARKSERVE_INLINE void rope_store_token_body(const T* row, const T* c, const T* s, const T* q_norm, const T* k_norm,
                                        T* k_cache, T* v_cache, int64_t slot, const AttendArgs& a, float* tmp,
                                        float* rot, float* q_rot) {
  const int64_t hd = a.head_dim;
  for (int64_t h = 0; h < a.num_heads; ++h) rope_head<T>(row + h * hd, q_norm, c, s, a, tmp, q_rot + h * hd);
  for (int64_t h = 0; h < a.num_kv_heads; ++h) {
    const int64_t base = h * a.cache_head_stride + slot * hd;
    rope_head<T>(row + (a.num_heads + h) * hd, k_norm, c, s, a, tmp, rot);
    const T* v = row + (a.num_heads + a.num_kv_heads + h) * hd;
    for (int64_t d = 0; d < hd; ++d) {
      k_cache[base + d] = narrow<T>(rot[d]);
      v_cache[base + d] = v[d];
    }
  }
}
SPARKSERVE_ISA_VARIANTS(rope_store_token,
                        (const T* row, const T* c, const T* s, const T* q_norm, const T* k_norm, T* k_cache, T* v_cache, int64_t slot, const AttendArgs& a, float* tmp, float* rot, float* q_rot),
                        (row, c, s, q_norm, k_norm, k_cache, v_cache, slot, a, tmp, rot, q_rot))

template <typename T>
void rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const T* q_norm,
                const T* k_norm, T* k_cache, T* v_cache, const int64_t* slots, const AttendArgs& a, float* q_rot) {
  const int64_t hd = a.head_dim, width = qkv.size(1), half = hd / 2;
  const T* qp = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  at::parallel_for(0, a.num_tokens, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(hd), rot(hd);
    for (int64_t t = begin; t < end; ++t)
      rope_store_token<T>(a.isa, qp + t * width, cp + t * half, sp + t * half, q_norm, k_norm, k_cache, v_cache, slots[t], a,
                          tmp.data(), rot.data(), q_rot + t * a.num_heads * hd);
  });
}

// Causal attention of query row (token t at position pos, block table `table`) for the G query heads of KV
// head kv_head over keys 0 .. pos: each key / value is read and widened to fp32 once for the G heads, block by
// block of the table (no division per key).
template <typename T>
SPARKSERVE_INLINE void attend_group_body(const float* q /* [G, hd] */, const T* k_cache, const T* v_cache,
                                    const int64_t* table, int64_t pos, int64_t kv_head, const AttendArgs& a,
                                    std::vector<float>& scores, std::vector<float>& row, std::vector<float>& acc,
                                    T* out /* [G, hd] */) {
  const int64_t hd = a.head_dim, length = pos + 1, group = a.num_heads / a.num_kv_heads, bs = a.block_size;
  const T* kc = k_cache + kv_head * a.cache_head_stride;
  const T* vc = v_cache + kv_head * a.cache_head_stride;
  float* r = row.data();
  scores.resize(group * length);
  for (int64_t l0 = 0; l0 < length; l0 += bs) {
    const T* block = kc + table[l0 / bs] * bs * hd;
    for (int64_t j = 0, n = std::min(bs, length - l0); j < n; ++j) {
      for (int64_t d = 0; d < hd; ++d) r[d] = widen(block[j * hd + d]);
      for (int64_t g = 0; g < group; ++g) scores[g * length + l0 + j] = rd<T>(dot(q + g * hd, r, hd)) * a.scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {  // softmax of each head's scores, rounded to the dtype as eager's probs
    float* s = scores.data() + g * length;
    float max_score = -INFINITY, sum = 0.0f;
    for (int64_t l = 0; l < length; ++l) max_score = std::max(max_score, s[l]);
    for (int64_t l = 0; l < length; ++l) s[l] = exp_ps(s[l] - max_score);
    for (int64_t l = 0; l < length; ++l) sum += s[l];
    const float inv = 1.0f / sum;
    for (int64_t l = 0; l < length; ++l) s[l] = rd<T>(s[l] * inv);
  }
  float* o = acc.data();
  std::fill(acc.begin(), acc.end(), 0.0f);
  for (int64_t l0 = 0; l0 < length; l0 += bs) {
    const T* block = vc + table[l0 / bs] * bs * hd;
    for (int64_t j = 0, n = std::min(bs, length - l0); j < n; ++j) {
      for (int64_t d = 0; d < hd; ++d) r[d] = widen(block[j * hd + d]);
      for (int64_t g = 0; g < group; ++g) {
        const float p = scores[g * length + l0 + j];
        for (int64_t d = 0; d < hd; ++d) o[g * hd + d] += p * r[d];
      }
    }
  }
  for (int64_t i = 0; i < group * hd; ++i) out[i] = narrow<T>(rd<T>(o[i]));
}
SPARKSERVE_ISA_VARIANTS(attend_group,
                        (const float* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t pos, int64_t kv_head, const AttendArgs& a, std::vector<float>& scores, std::vector<float>& row, std::vector<float>& acc, T* out),
                        (q, k_cache, v_cache, table, pos, kv_head, a, scores, row, acc, out))

template <typename T>
void attend(const float* q_rot, const T* k_cache, const T* v_cache, const at::Tensor& positions,
            const at::Tensor& q_index, const at::Tensor& q_valid, const at::Tensor& block_tables, const AttendArgs& a,
            at::Tensor& out) {
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* index = q_index.data_ptr<int64_t>();
  const bool* valid = q_valid.data_ptr<bool>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t items = a.num_seqs * a.q_max * a.num_kv_heads, hd = a.head_dim;
  const int64_t group = a.num_heads / a.num_kv_heads;
  at::parallel_for(0, items, 2, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, row(hd), acc(group * hd);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / a.num_kv_heads, kv_head = i % a.num_kv_heads;
      if (!valid[r]) continue;
      const int64_t t = index[r], s = r / a.q_max, head = kv_head * group;  // query heads head .. head + G - 1
      attend_group<T>(a.isa, q_rot + (t * a.num_heads + head) * hd, k_cache, v_cache, tables + s * a.max_blocks, pos[t],
                      kv_head, a, scores, row, acc, op + (t * a.num_heads + head) * hd);
    }
  });
}

at::Tensor rope_store_attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                             double eps, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping,
                             const at::Tensor& positions, const at::Tensor& q_index, const at::Tensor& q_valid,
                             const at::Tensor& block_tables, int64_t num_heads, int64_t num_kv_heads, double scale) {
  check_rows(qkv, "qkv");
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == dtype &&
                  v_cache.scalar_type() == dtype && k_cache.size(0) == num_kv_heads,
              "caches must be contiguous [Hkv, num_blocks, block_size, hd] in qkv's dtype");
  const int64_t hd = k_cache.size(3), tokens = qkv.size(0);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * hd,
              "qkv must be [T, (H + 2 Hkv) hd]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == tokens * hd / 2 &&
                  sin.numel() == cos.numel() && cos.scalar_type() == dtype && sin.scalar_type() == dtype,
              "cos / sin must be contiguous [T, hd / 2] in qkv's dtype");
  for (const auto* t : {&slot_mapping, &positions, &q_index, &block_tables})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors must be contiguous int64");
  TORCH_CHECK(slot_mapping.numel() == tokens && positions.numel() == tokens, "slot_mapping / positions must be [T]");
  TORCH_CHECK(q_valid.scalar_type() == at::kBool && q_valid.sizes() == q_index.sizes() && q_index.dim() == 2 &&
                  block_tables.dim() == 2 && block_tables.size(0) == q_index.size(0),
              "q_index / q_valid must be [S, q_max], block_tables [S, max_blocks]");
  AttendArgs a{tokens, num_heads, num_kv_heads, hd, k_cache.size(2), k_cache.size(1) * k_cache.size(2) * hd,
               q_index.size(0), q_index.size(1), block_tables.size(1), static_cast<float>(eps),
               static_cast<float>(scale), fused_isa()};
  at::Tensor out = at::zeros({tokens, num_heads, hd}, qkv.options());
  std::vector<float> q_rot(tokens * num_heads * hd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "rope_store_attend", [&] {
    const scalar_t* qn = q_norm.has_value() ? q_norm->data_ptr<scalar_t>() : nullptr;
    const scalar_t* kn = k_norm.has_value() ? k_norm->data_ptr<scalar_t>() : nullptr;
    rope_store<scalar_t>(qkv, cos, sin, qn, kn, k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                         slot_mapping.data_ptr<int64_t>(), a, q_rot.data());
    attend<scalar_t>(q_rot.data(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), positions, q_index,
                     q_valid, block_tables, a, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(sparkserve_fused, m) {
  m.def("add_rms_norm(Tensor x, Tensor? delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope_store_attend(Tensor qkv, Tensor cos, Tensor sin, Tensor? q_norm, Tensor? k_norm, float eps, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor positions, Tensor q_index, "
        "Tensor q_valid, Tensor block_tables, int num_heads, int num_kv_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparkserve_fused, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_store_attend", &rope_store_attend);
}
