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
// Softmax: max-subtracted exp, scaled by the reciprocal of the sum (ATen's CPU softmax).
// Threads: at::parallel_for (torch's OpenMP team) over tokens and over (query row, KV head) pairs.
// The hot loops are compiled for AVX-512, AVX2 and the baseline (GCC's target_clones picks at load time);
// without FMA contraction the three give the same bits.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

template <typename T>
inline float rd(float x) {  // round to the model dtype and back (identity for fp32)
  return static_cast<float>(static_cast<T>(x));
}

inline float dot(const float* a, const float* b, int64_t n) {
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
inline void rms_norm_row(const float* x, const T* w, float eps, int64_t n, float* out) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j] * x[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += x[i] * x[i];
  const float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t k = 0; k < n; ++k) out[k] = rd<T>(static_cast<float>(w[k]) * rd<T>(x[k] * inv));
}

template <typename T>
void add_rms_norm_impl(const at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                       float eps, at::Tensor& x_out, at::Tensor& h) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* dp = delta.has_value() ? delta->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* xo = x_out.data_ptr<T>();
  T* hp = h.data_ptr<T>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n), normed(n);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < n; ++k) {
        const float v = static_cast<float>(xp[r * n + k]);
        row[k] = dp == nullptr ? v : rd<T>(v + static_cast<float>(dp[r * n + k]));
        xo[r * n + k] = static_cast<T>(row[k]);
      }
      rms_norm_row<T>(row.data(), wp, eps, n, normed.data());
      for (int64_t k = 0; k < n; ++k) hp[r * n + k] = static_cast<T>(normed[k]);
    }
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

template <typename T>
void silu_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), inter = out.size(1);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * 2 * inter;
      const T* u = g + inter;
      for (int64_t k = 0; k < inter; ++k) {
        const float x = static_cast<float>(g[k]);
        const float act = rd<T>(x / (1.0f + std::exp(-x)));
        op[r * inter + k] = static_cast<T>(act * static_cast<float>(u[k]));
      }
    }
  });
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
};

// One head's vector from qkv (already dtype values) -> optional norm -> RoPE, into out (fp32 holding dtype values).
template <typename T>
inline void rope_head(const T* src, const T* norm_w, const T* cos, const T* sin, const AttendArgs& a, float* tmp,
                      float* out) {
  const int64_t hd = a.head_dim, half = hd / 2;
  for (int64_t d = 0; d < hd; ++d) tmp[d] = static_cast<float>(src[d]);
  if (norm_w != nullptr) rms_norm_row<T>(tmp, norm_w, a.eps, hd, tmp);
  for (int64_t d = 0; d < half; ++d) {
    const float x1 = tmp[d], x2 = tmp[d + half];
    const float c = static_cast<float>(cos[d]), s = static_cast<float>(sin[d]);
    out[d] = rd<T>(rd<T>(x1 * c) - rd<T>(x2 * s));
    out[d + half] = rd<T>(rd<T>(x2 * c) + rd<T>(x1 * s));
  }
}

template <typename T>
void rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const T* q_norm,
                const T* k_norm, T* k_cache, T* v_cache, const int64_t* slots, const AttendArgs& a, float* q_rot) {
  const int64_t hd = a.head_dim, width = qkv.size(1), half = hd / 2;
  const T* qp = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  at::parallel_for(0, a.num_tokens, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(hd), rot(hd);
    for (int64_t t = begin; t < end; ++t) {
      const T* row = qp + t * width;
      const T* c = cp + t * half;
      const T* s = sp + t * half;
      for (int64_t h = 0; h < a.num_heads; ++h)
        rope_head<T>(row + h * hd, q_norm, c, s, a, tmp.data(), q_rot + (t * a.num_heads + h) * hd);
      for (int64_t h = 0; h < a.num_kv_heads; ++h) {
        const int64_t base = h * a.cache_head_stride + slots[t] * hd;
        rope_head<T>(row + (a.num_heads + h) * hd, k_norm, c, s, a, tmp.data(), rot.data());
        const T* v = row + (a.num_heads + a.num_kv_heads + h) * hd;
        for (int64_t d = 0; d < hd; ++d) {
          k_cache[base + d] = static_cast<T>(rot[d]);
          v_cache[base + d] = v[d];
        }
      }
    }
  });
}

// Causal attention of query row (token t at position pos, block table `table`) for the G query heads of KV
// head kv_head over keys 0 .. pos: each key / value is read and widened to fp32 once for the G heads.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARKSERVE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPARKSERVE_CLONES
#endif

template <typename T>
SPARKSERVE_CLONES void attend_group(const float* q /* [G, hd] */, const T* k_cache, const T* v_cache, const int64_t* table, int64_t pos,
                  int64_t kv_head, const AttendArgs& a, std::vector<float>& scores, std::vector<float>& row,
                  std::vector<float>& acc, T* out /* [G, hd] */) {
  const int64_t hd = a.head_dim, length = pos + 1, group = a.num_heads / a.num_kv_heads;
  const T* kc = k_cache + kv_head * a.cache_head_stride;
  const T* vc = v_cache + kv_head * a.cache_head_stride;
  scores.resize(group * length);
  for (int64_t l = 0; l < length; ++l) {
    const T* k = kc + (table[l / a.block_size] * a.block_size + l % a.block_size) * hd;
    for (int64_t d = 0; d < hd; ++d) row[d] = static_cast<float>(k[d]);
    for (int64_t g = 0; g < group; ++g) scores[g * length + l] = rd<T>(dot(q + g * hd, row.data(), hd)) * a.scale;
  }
  for (int64_t g = 0; g < group; ++g) {  // softmax of each head's scores, rounded to the dtype as eager's probs
    float* s = scores.data() + g * length;
    float max_score = -INFINITY, sum = 0.0f;
    for (int64_t l = 0; l < length; ++l) max_score = std::max(max_score, s[l]);
    for (int64_t l = 0; l < length; ++l) {
      s[l] = std::exp(s[l] - max_score);
      sum += s[l];
    }
    const float inv = 1.0f / sum;
    for (int64_t l = 0; l < length; ++l) s[l] = rd<T>(s[l] * inv);
  }
  std::fill(acc.begin(), acc.end(), 0.0f);
  for (int64_t l = 0; l < length; ++l) {
    const T* v = vc + (table[l / a.block_size] * a.block_size + l % a.block_size) * hd;
    for (int64_t d = 0; d < hd; ++d) row[d] = static_cast<float>(v[d]);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * length + l];
      float* o = acc.data() + g * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] += p * row[d];
    }
  }
  for (int64_t i = 0; i < group * hd; ++i) out[i] = static_cast<T>(acc[i]);
}

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
      attend_group<T>(q_rot + (t * a.num_heads + head) * hd, k_cache, v_cache, tables + s * a.max_blocks, pos[t],
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
               static_cast<float>(scale)};
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
