// A Llama-family decoder stack run for a decode step in one call (decode_layer.cpp); bound in
// module.cpp, driven by models/fused_decode.py.

#pragma once

#include "quant_matrix.h"

#include <vector>

namespace lmf {

// One decoder layer's weights: RMSNorm weights (hidden,) float32, the fused q|k|v projection (and
// its bias, (q + 2 kv,) float32 or an empty tensor), o_proj, the fused gate|up projection, down_proj.
struct DecoderLayer {
  torch::Tensor input_layernorm, qkv_bias, post_attention_layernorm;
  QuantMatrix qkv_proj, o_proj, gate_up_proj, down_proj;
};

// Every layer of a Llama-family model (pre-norm RMSNorm, rotate-half RoPE, grouped-query
// attention over the paged KV cache, SwiGLU MLP), for batches of single-token decodes.
class Decoder {
 public:
  Decoder(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double rms_norm_eps);

  void add_layer(torch::Tensor input_layernorm, const QuantMatrix& qkv_proj, torch::Tensor qkv_bias,
                 const QuantMatrix& o_proj, torch::Tensor post_attention_layernorm,
                 const QuantMatrix& gate_up_proj, const QuantMatrix& down_proj);

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // The hidden states (M, hidden) after every layer, from the embeddings x (M, hidden):
  //   cos, sin (P, head_dim) float32: RoPE tables, cos = [c, c], sin = [-s, s] (RotaryEmbedding);
  //   positions (M,) int64; k_caches, v_caches: one (n_kv_heads, num_slots, head_dim) cache per
  //   layer (float32, float16 or bfloat16, all alike), this step's K/V written at slots (M,)
  //   int64; tables (M, W) int64 block ids of each row's context and lens (M,) int64 its
  //   length, this token included.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& positions, const std::vector<torch::Tensor>& k_caches,
                        const std::vector<torch::Tensor>& v_caches, const torch::Tensor& slots,
                        const torch::Tensor& tables, const torch::Tensor& lens,
                        int64_t block_size) const;

 private:
  struct Step;  // one forward call's inputs, checked
  template <typename T>  // the KV cache's element type: float, c10::Half or c10::BFloat16
  void run_layers(float* x, int64_t M, const Step& step) const;

  int64_t n_heads_, n_kv_heads_, head_dim_;
  float eps_;
  std::vector<DecoderLayer> layers_;
};

}  // namespace lmf
