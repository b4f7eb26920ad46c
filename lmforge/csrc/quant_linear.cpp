// Weight-only quantized linear layers for CPUs without bfloat16 math: y = x @ W^T, with W kept
// in 4-bit or 8-bit codes and float32 activations.
//
// A decode step reads every weight once per token, so it is bound by memory bandwidth: reading
// 4- or 8-bit codes instead of float32 weights is the lever (llama.cpp's design). Unlike
// llama.cpp, the activations stay float32: each group of weights is dequantized in registers
// (w = q * scale + zero) and multiplied in float32, so the result equals a float32 matmul of the
// dequantized weight up to summation order (models/quant_linear.py holds that reference).
//
// Layouts (models/gguf_quant.py converts GGUF's blocks into them):
//   bits 4: codes (N, K/2) uint8; group g's 32 weights sit in bytes [16g, 16g + 16): byte j holds
//           weight 32g + j in its low nibble and 32g + j + 16 in its high one (GGUF's Q4_0 order).
//   bits 8: codes (N, K) int8.
//   scale (N, K/G) float32; zero (N, K/G) float32, or an empty tensor for zero = 0.
// G is 32 for 4-bit codes and 16 or 32 for 8-bit ones.
//
// Threads: at::parallel_for over output rows, i.e. PyTorch's own intra-op pool and thread count.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMF_AVX2 1
#endif

namespace {

constexpr int64_t kMaxRows = 8;  // activation rows that share one register-dequantized group

#ifdef LMF_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 widen_u8(__m128i bytes) {  // the low 8 bytes -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

inline __m256 widen_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One output row against MR activation rows: out[m] = sum_k x[m, k] * w[k].
template <int MR, int BITS>
void dot_rows(const float* x, int64_t ldx, const uint8_t* codes, const float* scale,
              const float* zero, int64_t K, int64_t G, float* out, int64_t ldo) {
  constexpr int NA = MR <= 2 ? 4 : MR <= 4 ? 2 : 1;  // accumulators per row: FMA chains
  __m256 acc[MR][NA];
  for (int m = 0; m < MR; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
  const int64_t groups = K / G;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 s = _mm256_set1_ps(scale[g]);
    const __m256 z = _mm256_set1_ps(zero ? zero[g] : 0.0f);
    const float* xg = x + g * G;
    if (BITS == 4) {  // G == 32
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + g * 16));
      const __m128i mask = _mm_set1_epi8(0x0F);
      const __m128i lo = _mm_and_si128(packed, mask);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
      const __m256 w[4] = {_mm256_fmadd_ps(widen_u8(lo), s, z),
                           _mm256_fmadd_ps(widen_u8(_mm_srli_si128(lo, 8)), s, z),
                           _mm256_fmadd_ps(widen_u8(hi), s, z),
                           _mm256_fmadd_ps(widen_u8(_mm_srli_si128(hi, 8)), s, z)};
      for (int c = 0; c < 4; ++c)
        for (int m = 0; m < MR; ++m)
          acc[m][c % NA] = _mm256_fmadd_ps(w[c], _mm256_loadu_ps(xg + m * ldx + 8 * c),
                                           acc[m][c % NA]);
    } else {
      const int8_t* q = reinterpret_cast<const int8_t*>(codes) + g * G;
      for (int64_t c = 0; c < G / 8; ++c) {
        const __m256 w = _mm256_fmadd_ps(widen_i8(q + 8 * c), s, z);
        const int a = static_cast<int>((g * (G / 8) + c) % NA);  // G = 16 uses all chains too
        for (int m = 0; m < MR; ++m)
          acc[m][a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xg + m * ldx + 8 * c), acc[m][a]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    __m256 t = acc[m][0];
    for (int a = 1; a < NA; ++a) t = _mm256_add_ps(t, acc[m][a]);
    out[m * ldo] = hsum(t);
  }
}
#endif

// The weight w[k] of one output row, for the portable path and for dequantize().
inline float weight_at(const uint8_t* codes, const float* scale, const float* zero, int64_t k,
                       int64_t G, int bits) {
  const int64_t g = k / G;
  float q;
  if (bits == 4) {
    const int64_t j = k % 32;
    const uint8_t byte = codes[g * 16 + (j % 16)];
    q = static_cast<float>(j < 16 ? (byte & 0x0F) : (byte >> 4));
  } else {
    q = static_cast<float>(reinterpret_cast<const int8_t*>(codes)[k]);
  }
  return q * scale[g] + (zero ? zero[g] : 0.0f);
}

void dot_rows_portable(const float* x, int64_t ldx, int64_t rows, const uint8_t* codes,
                       const float* scale, const float* zero, int64_t K, int64_t G, int bits,
                       float* out, int64_t ldo) {
  for (int64_t m = 0; m < rows; ++m) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k) acc += x[m * ldx + k] * weight_at(codes, scale, zero, k, G, bits);
    out[m * ldo] = acc;
  }
}

void check_weight(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero,
                  int64_t bits, int64_t K) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(codes.is_contiguous() && scale.is_contiguous() && zero.is_contiguous(),
              "codes, scale and zero must be contiguous");
  TORCH_CHECK(codes.dim() == 2 && scale.dim() == 2, "codes and scale must be 2-D");
  TORCH_CHECK(codes.size(1) * (bits == 4 ? 2 : 1) == K, "codes do not hold K = ", K, " columns");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.size(0) == codes.size(0),
              "scale must be float32 with one row per output");
  TORCH_CHECK(scale.size(1) > 0 && K % scale.size(1) == 0, "K must be a multiple of the groups");
  const int64_t G = K / scale.size(1);
  TORCH_CHECK(bits == 4 ? G == 32 : (G % 8 == 0), "unsupported group size ", G, " for ", bits, " bits");
  TORCH_CHECK(zero.numel() == 0 || zero.sizes() == scale.sizes(), "zero must match scale or be empty");
}

}  // namespace

// y (M, N) = x (M, K) @ W^T, W (N, K) given as codes, scale and zero (see the layouts above).
torch::Tensor quant_linear(const torch::Tensor& x, const torch::Tensor& codes,
                           const torch::Tensor& scale, const torch::Tensor& zero, int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous (M, K) float32 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  check_weight(codes, scale, zero, bits, K);
  const int64_t G = K / scale.size(1);
  const int64_t row_bytes = codes.size(1);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.numel() ? zero.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t groups = K / G;
#ifdef LMF_AVX2
  using Kernel = void (*)(const float*, int64_t, const uint8_t*, const float*, const float*,
                          int64_t, int64_t, float*, int64_t);
  static const Kernel kernels[2][kMaxRows] = {
      {dot_rows<1, 4>, dot_rows<2, 4>, dot_rows<3, 4>, dot_rows<4, 4>,
       dot_rows<5, 4>, dot_rows<6, 4>, dot_rows<7, 4>, dot_rows<8, 4>},
      {dot_rows<1, 8>, dot_rows<2, 8>, dot_rows<3, 8>, dot_rows<4, 8>,
       dot_rows<5, 8>, dot_rows<6, 8>, dot_rows<7, 8>, dot_rows<8, 8>}};
#endif
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* c = cp + n * row_bytes;
      const float* s = sp + n * groups;
      const float* z = zp ? zp + n * groups : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, M - m0);
        const float* xr = xp + m0 * K;
        float* out = yp + m0 * N + n;
#ifdef LMF_AVX2
        kernels[bits == 4 ? 0 : 1][rows - 1](xr, K, c, s, z, K, G, out, N);
#else
        dot_rows_portable(xr, K, rows, c, s, z, K, G, static_cast<int>(bits), out, N);
#endif
      }
    }
  });
  return y;
}

// The dense (N, K) float32 weight, for large batches (prefill), which run as one float32 GEMM.
torch::Tensor dequantize(const torch::Tensor& codes, const torch::Tensor& scale,
                         const torch::Tensor& zero, int64_t bits) {
  const int64_t N = codes.size(0), K = codes.size(1) * (bits == 4 ? 2 : 1);
  check_weight(codes, scale, zero, bits, K);
  const int64_t G = K / scale.size(1), groups = K / G, row_bytes = codes.size(1);
  auto w = torch::empty({N, K}, scale.options());
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.numel() ? zero.data_ptr<float>() : nullptr;
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t k = 0; k < K; ++k)
        wp[n * K + k] = weight_at(cp + n * row_bytes, sp + n * groups, zp ? zp + n * groups : nullptr,
                                  k, G, static_cast<int>(bits));
  });
  return w;
}

bool has_avx2() {
#ifdef LMF_AVX2
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_linear", &quant_linear, "y = x @ W^T with W in 4- or 8-bit groups (float32 x)");
  m.def("dequantize", &dequantize, "the dense float32 weight of 4- or 8-bit groups");
  m.def("has_avx2", &has_avx2, "whether the AVX2/FMA path was compiled in");
}
