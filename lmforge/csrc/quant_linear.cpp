// Weight-only quantized linear layers for CPUs without bfloat16 math: y = x @ W^T, with W kept
// in 4-, 5- or 8-bit codes and float32 activations.
//
// A decode step reads every weight once per token, so it is bound by memory bandwidth: reading
// 4- to 8-bit codes instead of float32 weights is the lever (llama.cpp's design). Unlike
// llama.cpp, the activations stay float32 by default: each group of weights is dequantized in
// registers (w = q * scale + zero) and multiplied in float32, so the result equals a float32
// matmul of the dequantized weight up to summation order (models/quant_linear.py holds that
// reference). With int8_activations (--int8-activations), x is first quantized to int8 in groups
// of 32 and multiplied in integer dot products, as llama.cpp does (q8_kernels.h).
//
// Layouts (models/gguf_quant.py converts GGUF's blocks into them):
//   bits 4: codes (N, K/2) uint8; group g's 32 weights sit in bytes [16g, 16g + 16): byte j holds
//           weight 32g + j in its low nibble and 32g + j + 16 in its high one (GGUF's Q4_0 order).
//   bits 5: the 4-bit layout for the low four bits, plus high (N, K/32) int32 whose bit j is the
//           fifth bit of weight 32g + j (GGUF's Q5_0 qh order).
//   bits 8: codes (N, K) int8.
//   scale (N, K/G) float32; zero (N, K/G) float32, or an empty tensor for zero = 0; high is an
//   empty tensor unless bits is 5.
// G is 32 for 4- and 5-bit codes and 16 or 32 for 8-bit ones.
//
// Vector paths: AVX-512 or AVX2+FMA, whichever -march=native allows; portable C++ otherwise.
// Threads: at::parallel_for over output rows, i.e. PyTorch's own intra-op pool and thread count.

#include "quant_linear.h"

#include "quant_matrix.h"

using namespace lmf;


// y (M, N) = x (M, K) @ W^T, W (N, K) given as codes, scale, zero and high (the layouts above);
// with int8_activations, x's int8 codes in groups of 32 instead of x.
torch::Tensor quant_linear(const torch::Tensor& x, const torch::Tensor& codes,
                           const torch::Tensor& scale, const torch::Tensor& zero,
                           const torch::Tensor& high, int64_t bits, bool int8_activations) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous (M, K) float32 tensor");
  const QuantMatrix w(codes, scale, zero, high, bits, int8_activations);
  TORCH_CHECK(x.size(1) == w.K, "codes do not hold K = ", x.size(1), " columns");
  auto y = torch::empty({x.size(0), w.N}, x.options());
  w.matmul(x.data_ptr<float>(), x.size(0), y.data_ptr<float>());
  return y;
}

// The dense (N, K) float32 weight, for large batches (prefill), which run as one float32 GEMM.
torch::Tensor dequantize(const torch::Tensor& codes, const torch::Tensor& scale,
                         const torch::Tensor& zero, const torch::Tensor& high, int64_t bits) {
  const int64_t N = codes.size(0), K = codes.size(1) * (bits == 8 ? 1 : 2);
  check_weight(codes, scale, zero, high, bits, K);
  const int64_t G = K / scale.size(1);
  auto w = torch::empty({N, K}, scale.options());
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Row r = row_of(codes, scale, zero, high, n);
#ifdef LMF_SIMD
      if (bits == 4) dequantize_row<4, 32>(r, K, wp + n * K);
      else if (bits == 5) dequantize_row<5, 32>(r, K, wp + n * K);
      else if (G == 32) dequantize_row<8, 32>(r, K, wp + n * K);
      else dequantize_row<8, 16>(r, K, wp + n * K);
#else
      for (int64_t k = 0; k < K; ++k) wp[n * K + k] = weight_at(r, k, G, static_cast<int>(bits));
#endif
    }
  });
  return w;
}

std::string isa() {  // which vector path was compiled in
#if LMF_SIMD == 512
  return "AVX-512";
#elif LMF_SIMD == 256
  return "AVX2";
#else
  return "portable C++";
#endif
}
