// One quantized linear layer at a time (quant_linear.cpp); bound in module.cpp.

#pragma once

#include <torch/extension.h>

#include <string>

// y (M, N) = x (M, K) @ W^T, W (N, K) given as codes, scale, zero and high; with
// int8_activations, x quantized to int8 in groups of 32 first.
torch::Tensor quant_linear(const torch::Tensor& x, const torch::Tensor& codes,
                           const torch::Tensor& scale, const torch::Tensor& zero,
                           const torch::Tensor& high, int64_t bits, bool int8_activations);

// The dense (N, K) float32 weight, for large batches (prefill).
torch::Tensor dequantize(const torch::Tensor& codes, const torch::Tensor& scale,
                         const torch::Tensor& zero, const torch::Tensor& high, int64_t bits);

// Which vector path was compiled in: "AVX-512", "AVX2" or "portable C++".
std::string isa();
