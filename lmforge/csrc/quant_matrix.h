// QuantMatrix: a checked quantized weight and its matmul, shared by quant_linear.cpp (one linear
// layer) and decode_layer.cpp (a whole decoder layer): float32 activations, or (int8_activations)
// activations quantized to int8 in groups of 32 first, as llama.cpp does (q8_kernels.h).

#pragma once

#include "q8_kernels.h"

#include <vector>

namespace lmf {

inline void check_weight(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero,
                  const torch::Tensor& high, int64_t bits, int64_t K) {
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "bits must be 4, 5 or 8, got ", bits);
  TORCH_CHECK(codes.is_contiguous() && scale.is_contiguous() && zero.is_contiguous() &&
              high.is_contiguous(), "codes, scale, zero and high must be contiguous");
  TORCH_CHECK(codes.dim() == 2 && scale.dim() == 2, "codes and scale must be 2-D");
  TORCH_CHECK(codes.size(1) * (bits == 8 ? 1 : 2) == K, "codes do not hold K = ", K, " columns");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.size(0) == codes.size(0),
              "scale must be float32 with one row per output");
  TORCH_CHECK(scale.size(1) > 0 && K % scale.size(1) == 0, "K must be a multiple of the groups");
  const int64_t G = K / scale.size(1);
  TORCH_CHECK(bits == 8 ? (G == 16 || G == 32) : G == 32, "unsupported group size ", G, " for ",
              bits, " bits");
  TORCH_CHECK(zero.numel() == 0 || zero.sizes() == scale.sizes(), "zero must match scale or be empty");
  TORCH_CHECK(bits == 5 ? (high.scalar_type() == torch::kInt32 && high.sizes() == scale.sizes())
                        : high.numel() == 0,
              "high must be (N, K/32) int32 for 5-bit codes and empty otherwise");
}

// Row n of a checked weight.
inline Row row_of(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero,
           const torch::Tensor& high, int64_t n) {
  const int64_t groups = scale.size(1);
  return Row{static_cast<const uint8_t*>(codes.data_ptr()) + n * codes.size(1),
             scale.data_ptr<float>() + n * groups,
             zero.numel() ? zero.data_ptr<float>() + n * groups : nullptr,
             high.numel() ? reinterpret_cast<const uint32_t*>(high.data_ptr<int32_t>()) + n * groups
                          : nullptr};
}


// A checked (N, K) quantized weight and the pointers its rows start from.
struct QuantMatrix {
  torch::Tensor codes, scale, zero, high;  // held, so the memory outlives every use
  int64_t bits, N, K, G;

  bool int8_activations;  // quantize x to int8 first (q8_kernels.h), as llama.cpp does

  QuantMatrix(torch::Tensor codes_, torch::Tensor scale_, torch::Tensor zero_, torch::Tensor high_,
              int64_t bits_, bool int8_activations_ = false)
      : codes(std::move(codes_)), scale(std::move(scale_)), zero(std::move(zero_)),
        high(std::move(high_)), bits(bits_), int8_activations(int8_activations_) {
    TORCH_CHECK(codes.dim() == 2 && scale.dim() == 2, "codes and scale must be 2-D");
    N = codes.size(0);
    K = codes.size(1) * (bits == 8 ? 1 : 2);
    check_weight(codes, scale, zero, high, bits, K);
    G = K / scale.size(1);
    TORCH_CHECK(!int8_activations || K % kQ8Group == 0,
                "int8 activations need K a multiple of 32, got ", K);
  }

  Row row(int64_t n) const { return row_of(codes, scale, zero, high, n); }

  // y[m * N + n] = sum_k x[m * K + k] * w[n, k] for m < M, in float32 (with int8_activations,
  // x's int8 codes instead: matmul_q8).
  void matmul(const float* x, int64_t M, float* y) const {
    if (int8_activations) return matmul_q8(x, M, y);
    matmul_float(x, M, y);
  }

  void matmul_float(const float* x, int64_t M, float* y) const {
#if LMF_SIMD == 512
    if (M >= kTileMinRows) return matmul_tiles(x, M, y);
#endif
#ifdef LMF_SIMD
    const Kernel* kernels = kernels_for(bits, G);
#endif
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const Row r = row(n);
        for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
          const int64_t rows = std::min(kMaxRows, M - m0);
#ifdef LMF_SIMD
          kernels[rows - 1](x + m0 * K, K, r, K, y + m0 * N + n, N);
#else
          for (int64_t m = m0; m < m0 + rows; ++m) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; ++k) acc += x[m * K + k] * weight_at(r, k, G, static_cast<int>(bits));
            y[m * N + n] = acc;
          }
#endif
        }
      }
    });
  }

  // matmul of x quantized to int8 in groups of 32 (Q8Rows): one output row per task of
  // at::parallel_for, each against up to kMaxRows activation rows at a time, in integer dot
  // products. From kTileMinRows rows on (AVX-512) and without vector instructions, the codes'
  // values run through the float32 kernels instead: the same values, so the same result up to
  // summation order.
  void matmul_q8(const float* x, int64_t M, float* y) const {
#ifdef LMF_SIMD
    if (M <= kQ8KernelMaxRows) {
      const Q8Rows xq(x, M, K);
      const Q8Kernel* kernels = q8_kernels_for(bits, G);
      at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const Row r = row(n);
          for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
            kernels[std::min(kMaxRows, M - m0) - 1](xq, m0, r, y + m0 * N + n, N);
        }
      });
      return;
    }
#endif
    AlignedBuffer<float> values(M * K);
    Q8Rows::fake_quantize(x, M * K, values.data());
    matmul_float(values.data(), M, y);
  }

#if LMF_SIMD == 512
  // matmul for M >= kTileMinRows: kTileN output rows at a time, in tiles of kTileM activation rows;
  // the rows past the last full tile (of M, and of N) through dot_rows.
  void matmul_tiles(const float* x, int64_t M, float* y) const {
    const TileKernel tiled = tile_for(bits, G);
    const Kernel* kernels = kernels_for(bits, G);
    const int64_t full_m = M / kTileM * kTileM;
    at::parallel_for(0, (N + kTileN - 1) / kTileN, 4, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n0 = b * kTileN, n1 = std::min(N, n0 + kTileN);
        int64_t m0 = 0;
        if (n1 - n0 == kTileN) {
          Row rows[kTileN];
          for (int j = 0; j < kTileN; ++j) rows[j] = row(n0 + j);
          for (; m0 < full_m; m0 += kTileM) tiled(x + m0 * K, K, rows, K, y + m0 * N + n0, N);
        }
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t m = m0; m < M; m += kMaxRows) {
            const int64_t rows = std::min(kMaxRows, M - m);
            kernels[rows - 1](x + m * K, K, row(n), K, y + m * N + n, N);
          }
      }
    });
  }
#endif
};

}  // namespace lmf
