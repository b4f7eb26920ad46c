// A decode step through every decoder layer of a Llama-family model in one call.
//
// At one sequence a decode step of SmolLM2-135M is ~1000 small PyTorch ops (30 layers of norms,
// RoPE, cache writes, attention, residuals, activations, four projections); each costs 5-20 us
// of dispatch and Python before any arithmetic, about as much as the arithmetic itself. Here the
// whole stack runs in C++: the projections through the quantized kernel (quant_kernels.h), the
// rest as plain loops over the few rows of a decode batch. It computes what models/llama.py
// computes (Hugging Face's Llama: Touvron et al. 2023), in float32, up to summation order:
//
//   h = RMSNorm(x);  q|k|v = h @ Wqkv^T (+ b);  q, k = RoPE(q), RoPE(k);  cache[slot] = k, v
//   x += softmax(q k^T / sqrt(D)) v @ Wo^T      (grouped-query, over the paged context)
//   h = RMSNorm(x);  g|u = h @ Wgu^T;  x += (silu(g) * u) @ Wdown^T
//
// Threads: the projections run on at::parallel_for over output rows (PyTorch's pool); attention
// over (sequence, KV head) pairs; norms, RoPE and the activation are a few thousand floats
// and stay on the calling thread.

#include "decode_layer.h"

#include <cmath>
#include <limits>

namespace lmf {
namespace {

// Rotate-half RoPE of one head in place: x[i] = x[i] cos[i] + x[(i + D/2) % D] sin[i]
void rope(float* x, const float* cos, const float* sin, int64_t d, float* tmp) {
  const int64_t half = d / 2;
  std::copy_n(x, d, tmp);
  for (int64_t i = 0; i < half; ++i) x[i] = tmp[i] * cos[i] + tmp[i + half] * sin[i];
  for (int64_t i = half; i < d; ++i) x[i] = tmp[i] * cos[i] + tmp[i - half] * sin[i];
}

// A KV cache element (float, c10::Half or c10::BFloat16): L of them as floats.
#ifdef LMF_SIMD
inline typename Vec::T load_kv(const float* p) { return Vec::load(p); }
inline typename Vec::T load_kv(const c10::Half* p) { return Vec::f16(reinterpret_cast<const uint16_t*>(p)); }
inline typename Vec::T load_kv(const c10::BFloat16* p) { return Vec::bf16(reinterpret_cast<const uint16_t*>(p)); }
#endif

// sum_i q[i] * k[i]: k a cached key (float, c10::Half or c10::BFloat16), or any float vector
template <typename T>
inline float dot_kv(const float* q, const T* k, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#ifdef LMF_SIMD
  typename Vec::T acc = Vec::zero();
  for (; i + Vec::L <= n; i += Vec::L) acc = Vec::fma(Vec::load(q + i), load_kv(k + i), acc);
  s = Vec::sum(acc);
#endif
  for (; i < n; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

// y = x / sqrt(mean(x^2) + eps) * w, one (hidden,) row
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  const float inv = 1.0f / std::sqrt(dot_kv(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// o += w * v, v a cached value
template <typename T>
inline void axpy_kv(float w, const T* v, float* o, int64_t n) {
  int64_t i = 0;
#ifdef LMF_SIMD
  const typename Vec::T wv = Vec::set1(w);
  for (; i + Vec::L <= n; i += Vec::L) Vec::store(o + i, Vec::fma(wv, load_kv(v + i), Vec::load(o + i)));
#endif
  for (; i < n; ++i) o[i] += w * static_cast<float>(v[i]);
}

// p[i] = e^(p[i] - mx) for i < n; returns their sum
inline float exp_shifted(float* p, int64_t n, float mx) {
  int64_t i = 0;
  float total = 0.0f;
#ifdef LMF_SIMD
  typename Vec::T acc = Vec::zero();
  for (; i + Vec::L <= n; i += Vec::L) {
    const typename Vec::T e = vec_exp(Vec::sub(Vec::load(p + i), Vec::set1(mx)));
    Vec::store(p + i, e);
    acc = Vec::add(acc, e);
  }
  total = Vec::sum(acc);
#endif
  for (; i < n; ++i) total += (p[i] = std::exp(p[i] - mx));
  return total;
}

// act[j] = silu(gate[j]) * up[j] = gate[j] / (1 + e^-gate[j]) * up[j], for j < n
inline void silu_mul(const float* gate, const float* up, int64_t n, float* act) {
  int64_t j = 0;
#ifdef LMF_SIMD
  const typename Vec::T one = Vec::set1(1.0f);
  for (; j + Vec::L <= n; j += Vec::L) {
    const typename Vec::T g = Vec::load(gate + j);
    const typename Vec::T e = vec_exp(Vec::sub(Vec::zero(), g));
    Vec::store(act + j, Vec::mul(Vec::div(g, Vec::add(one, e)), Vec::load(up + j)));
  }
#endif
  for (; j < n; ++j) act[j] = gate[j] / (1.0f + std::exp(-gate[j])) * up[j];
}

template <typename T>
struct Context {  // where each decode row's context lives in one layer's paged cache
  const T* k_cache;  // (n_kv, num_slots, D)
  const T* v_cache;
  int64_t num_slots;
  const int64_t* tables;  // (M, W)
  int64_t width;
  const int64_t* lens;  // (M,)
  int64_t block_size;

  // f(t, slot) for the cache slot of every context position t < lens[b], block by block
  template <typename F>
  void for_each_slot(int64_t b, F&& f) const {
    const int64_t len = lens[b];
    for (int64_t t0 = 0, i = 0; t0 < len; t0 += block_size, ++i) {
      const int64_t base = tables[b * width + i] * block_size, n = std::min(block_size, len - t0);
      for (int64_t o = 0; o < n; ++o) f(t0 + o, base + o);
    }
  }
};

// out (M, H * D) = attention of the queries in qkv (row stride ldq, heads first) over each row's
// context: softmax(q k^T * scale) v, query head h reading KV head h / (H / n_kv). One task per
// (row, KV head): its group of query heads reads each cached key and value once.
template <typename T>
void attention(const float* qkv, int64_t ldq, int64_t M, int64_t H, int64_t n_kv, int64_t D,
               const Context<T>& ctx, float* out) {
  const int64_t group = H / n_kv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, M * n_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / n_kv, kv = i % n_kv, len = ctx.lens[b];
      const float* q = qkv + b * ldq + kv * group * D;  // the group's query heads, side by side
      const T* keys = ctx.k_cache + kv * ctx.num_slots * D;
      const T* values = ctx.v_cache + kv * ctx.num_slots * D;
      p.resize(static_cast<size_t>(group * len));
      ctx.for_each_slot(b, [&](int64_t t, int64_t slot) {
        for (int64_t g = 0; g < group; ++g) p[g * len + t] = dot_kv(q + g * D, keys + slot * D, D) * scale;
      });
      float* o = out + b * H * D + kv * group * D;
      std::fill_n(o, group * D, 0.0f);
      std::vector<float> inv(group);
      for (int64_t g = 0; g < group; ++g) {
        float* pg = p.data() + g * len;
        inv[g] = 1.0f / exp_shifted(pg, len, *std::max_element(pg, pg + len));
      }
      ctx.for_each_slot(b, [&](int64_t t, int64_t slot) {
        for (int64_t g = 0; g < group; ++g) axpy_kv(p[g * len + t], values + slot * D, o + g * D, D);
      });
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < D; ++d) o[g * D + d] *= inv[g];
    }
  });
}

void check_cache(const torch::Tensor& c, const torch::Tensor& first, int64_t n_kv, int64_t D) {
  TORCH_CHECK(c.scalar_type() == first.scalar_type() && c.is_contiguous() && c.dim() == 3 &&
                  c.size(0) == n_kv && c.size(1) == first.size(1) && c.size(2) == D,
              "each KV cache must be a contiguous (n_kv_heads, num_slots, head_dim) tensor like the first");
}

}  // namespace

Decoder::Decoder(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double rms_norm_eps)
    : n_heads_(n_heads), n_kv_heads_(n_kv_heads), head_dim_(head_dim),
      eps_(static_cast<float>(rms_norm_eps)) {
  TORCH_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0 && head_dim % 2 == 0,
              "n_heads must be a multiple of n_kv_heads and head_dim even");
}

void Decoder::add_layer(torch::Tensor input_layernorm, const QuantMatrix& qkv_proj,
                        torch::Tensor qkv_bias, const QuantMatrix& o_proj,
                        torch::Tensor post_attention_layernorm, const QuantMatrix& gate_up_proj,
                        const QuantMatrix& down_proj) {
  const int64_t hidden = input_layernorm.numel(), q_out = n_heads_ * head_dim_;
  TORCH_CHECK(qkv_proj.K == hidden && qkv_proj.N == q_out + 2 * n_kv_heads_ * head_dim_,
              "qkv_proj must be (q + 2 kv, hidden)");
  TORCH_CHECK(o_proj.K == q_out && o_proj.N == hidden, "o_proj must be (hidden, q)");
  TORCH_CHECK(gate_up_proj.K == hidden && gate_up_proj.N % 2 == 0 &&
                  down_proj.K == gate_up_proj.N / 2 && down_proj.N == hidden,
              "gate_up_proj must be (2 I, hidden) and down_proj (hidden, I)");
  TORCH_CHECK(qkv_bias.numel() == 0 || qkv_bias.numel() == qkv_proj.N, "qkv_bias has the wrong size");
  for (const auto* t : {&input_layernorm, &post_attention_layernorm, &qkv_bias})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "norm weights and biases must be contiguous float32");
  layers_.push_back(DecoderLayer{input_layernorm, qkv_bias, post_attention_layernorm, qkv_proj,
                                 o_proj, gate_up_proj, down_proj});
}

struct Decoder::Step {
  const float* cos;  // (P, D)
  const float* sin;
  const int64_t* positions;  // (M,)
  const int64_t* slots;
  const int64_t* lens;
  const int64_t* tables;  // (M, width)
  int64_t width, block_size, num_slots;
  const std::vector<torch::Tensor>& k_caches;
  const std::vector<torch::Tensor>& v_caches;
};

torch::Tensor Decoder::forward(const torch::Tensor& x, const torch::Tensor& cos,
                               const torch::Tensor& sin, const torch::Tensor& positions,
                               const std::vector<torch::Tensor>& k_caches,
                               const std::vector<torch::Tensor>& v_caches,
                               const torch::Tensor& slots, const torch::Tensor& tables,
                               const torch::Tensor& lens, int64_t block_size) const {
  const int64_t L = num_layers(), D = head_dim_;
  TORCH_CHECK(L > 0 && static_cast<int64_t>(k_caches.size()) == L &&
                  static_cast<int64_t>(v_caches.size()) == L,
              "one K and one V cache per layer");
  for (int64_t l = 0; l < L; ++l) {
    check_cache(k_caches[l], k_caches[0], n_kv_heads_, D);
    check_cache(v_caches[l], k_caches[0], n_kv_heads_, D);
  }
  const int64_t hidden = layers_[0].input_layernorm.numel();
  TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden && x.scalar_type() == torch::kFloat32,
              "x must be (M, hidden) float32");
  const int64_t M = x.size(0);
  for (const auto* t : {&positions, &slots, &lens})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->numel() == M,
                "positions, slots and lens must be (M,) int64");
  TORCH_CHECK(tables.scalar_type() == torch::kInt64 && tables.is_contiguous() && tables.dim() == 2 &&
                  tables.size(0) == M, "tables must be (M, W) int64");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && cos.is_contiguous() && cos.size(1) == D &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous(),
              "cos and sin must be contiguous (P, head_dim) float32");
  const Step step{cos.data_ptr<float>(), sin.data_ptr<float>(), positions.data_ptr<int64_t>(),
                  slots.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), tables.data_ptr<int64_t>(),
                  tables.size(1), block_size, k_caches[0].size(1), k_caches, v_caches};
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(step.positions[m] >= 0 && step.positions[m] < cos.size(0) && step.lens[m] > 0 &&
                    step.lens[m] <= step.width * block_size, "a position or length out of range");
    TORCH_CHECK(step.slots[m] >= 0 && step.slots[m] < step.num_slots, "a cache slot out of range");
  }
  torch::Tensor out = x.contiguous().clone();
  switch (k_caches[0].scalar_type()) {
    case torch::kFloat32: run_layers<float>(out.data_ptr<float>(), M, step); break;
    case torch::kFloat16: run_layers<c10::Half>(out.data_ptr<float>(), M, step); break;
    case torch::kBFloat16: run_layers<c10::BFloat16>(out.data_ptr<float>(), M, step); break;
    default: TORCH_CHECK(false, "KV caches must be float32, float16 or bfloat16");
  }
  return out;
}

template <typename T>
void Decoder::run_layers(float* xs, int64_t M, const Step& step) const {
  const int64_t H = n_heads_, n_kv = n_kv_heads_, D = head_dim_, S = step.num_slots;
  const int64_t hidden = layers_[0].input_layernorm.numel();
  const int64_t n_qkv = layers_[0].qkv_proj.N, inter = layers_[0].down_proj.K;
  auto buf = [&](int64_t n) { return std::vector<float>(static_cast<size_t>(M * n)); };
  std::vector<float> h = buf(hidden), qkv = buf(n_qkv), attn = buf(H * D), proj = buf(hidden),
                     gate_up = buf(2 * inter), act = buf(inter), tmp(D);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const DecoderLayer& w = layers_[l];
    T* kc = step.k_caches[l].data_ptr<T>();
    T* vc = step.v_caches[l].data_ptr<T>();
    const float* bias = w.qkv_bias.numel() ? w.qkv_bias.data_ptr<float>() : nullptr;
    for (int64_t m = 0; m < M; ++m)
      rms_norm(xs + m * hidden, w.input_layernorm.data_ptr<float>(), hidden, eps_, h.data() + m * hidden);
    w.qkv_proj.matmul(h.data(), M, qkv.data());
    for (int64_t m = 0; m < M; ++m) {
      float* row = qkv.data() + m * n_qkv;
      if (bias)
        for (int64_t j = 0; j < n_qkv; ++j) row[j] += bias[j];
      const float* c = step.cos + step.positions[m] * D;
      const float* s = step.sin + step.positions[m] * D;
      for (int64_t head = 0; head < H + n_kv; ++head) rope(row + head * D, c, s, D, tmp.data());
      for (int64_t g = 0; g < n_kv; ++g)  // this token's K and V into the cache
        for (int64_t d = 0; d < D; ++d) {
          kc[(g * S + step.slots[m]) * D + d] = static_cast<T>(row[(H + g) * D + d]);
          vc[(g * S + step.slots[m]) * D + d] = static_cast<T>(row[(H + n_kv + g) * D + d]);
        }
    }
    const Context<T> ctx{kc, vc, S, step.tables, step.width, step.lens, step.block_size};
    attention(qkv.data(), n_qkv, M, H, n_kv, D, ctx, attn.data());
    w.o_proj.matmul(attn.data(), M, proj.data());
    for (int64_t i = 0; i < M * hidden; ++i) xs[i] += proj[i];
    for (int64_t m = 0; m < M; ++m)
      rms_norm(xs + m * hidden, w.post_attention_layernorm.data_ptr<float>(), hidden, eps_,
               h.data() + m * hidden);
    w.gate_up_proj.matmul(h.data(), M, gate_up.data());
    for (int64_t m = 0; m < M; ++m) {
      const float* g = gate_up.data() + m * 2 * inter;
      silu_mul(g, g + inter, inter, act.data() + m * inter);
    }
    w.down_proj.matmul(act.data(), M, proj.data());
    for (int64_t i = 0; i < M * hidden; ++i) xs[i] += proj[i];
  }
}

}  // namespace lmf
