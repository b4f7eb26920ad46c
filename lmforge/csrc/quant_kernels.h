// lmforge's quantized-weight kernels, shared by quant_linear.cpp (one linear layer) and
// decode_layer.cpp (a whole decoder layer): the layouts and vector paths are described there.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LMF_SIMD 512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LMF_SIMD 256
#endif

namespace lmf {


constexpr int64_t kMaxRows = 8;  // activation rows that share one register-dequantized group

#if LMF_SIMD == 512
struct Vec {  // AVX-512: 16 floats
  using T = __m512;
  static constexpr int L = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T round(T v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static T times_pow2(T p, T n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integral
  static float sum(T v) { return _mm512_reduce_add_ps(v); }
  static T u8(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }  // 16 bytes
  // L float16 or bfloat16 values (a KV cache read by decode_layer.cpp) as floats
  static T f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static T bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static T i8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // a 4-bit group's 32 weights: low nibbles are weights 0..15, high ones 16..31
  static void nibbles(__m128i lo, __m128i hi, T s, T z, T* w) {
    w[0] = fma(u8(lo), s, z);
    w[1] = fma(u8(hi), s, z);
  }
};
#elif LMF_SIMD == 256
struct Vec {  // AVX2: 8 floats
  using T = __m256;
  static constexpr int L = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T round(T v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static T times_pow2(T p, T n) {  // p * 2^n, n integral in [-126, 127]
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static float sum(T v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
  }
  static T u8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }  // low 8 bytes
  static T f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static T bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static T i8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void nibbles(__m128i lo, __m128i hi, T s, T z, T* w) {
    w[0] = fma(u8(lo), s, z);
    w[1] = fma(u8(_mm_srli_si128(lo, 8)), s, z);
    w[2] = fma(u8(hi), s, z);
    w[3] = fma(u8(_mm_srli_si128(hi, 8)), s, z);
  }
};
#endif

#ifdef LMF_SIMD
// e^x, lane by lane: x = n ln2 + r, |r| <= ln2 / 2, e^r from Cephes' expf polynomial (~1 ulp);
// x is clamped to [-87.3, 88.4], so e^-inf gives ~1e-38 rather than 0.
inline Vec::T vec_exp(Vec::T x) {
  x = Vec::max(Vec::min(x, Vec::set1(88.3762626647949f)), Vec::set1(-87.3365478515625f));
  const Vec::T n = Vec::round(Vec::mul(x, Vec::set1(1.44269504088896341f)));
  Vec::T r = Vec::fma(n, Vec::set1(-0.693359375f), x);
  r = Vec::fma(n, Vec::set1(2.12194440e-4f), r);
  Vec::T p = Vec::set1(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = Vec::fma(p, r, Vec::set1(c));
  return Vec::times_pow2(Vec::fma(p, Vec::mul(r, r), Vec::add(r, Vec::set1(1.0f))), n);
}
#endif

// One output row's weight: where its codes, scales, zeros and fifth bits start.
struct Row {
  const uint8_t* codes;
  const float* scale;
  const float* zero;    // nullptr: zero = 0
  const uint32_t* high;  // nullptr unless 5-bit
};

#ifdef LMF_SIMD
// 16 bits of h -> 16 bytes: 16 where bit j is set, else 0 (AVX-512BW: one masked move;
// otherwise SSSE3: spread the two bytes, test each lane's bit).
#if defined(__AVX512BW__) && defined(__AVX512VL__)
inline __m128i fifth_bits(uint32_t h) { return _mm_maskz_set1_epi8(static_cast<__mmask16>(h), 16); }
#else
inline __m128i fifth_bits(uint32_t h) {
  const __m128i spread = _mm_shuffle_epi8(_mm_set1_epi32(static_cast<int>(h)),
                                          _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
  const __m128i bit = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
  return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(spread, bit), bit), _mm_set1_epi8(16));
}
#endif

// The G weights of group g of one output row, dequantized into G / Vec::L vectors.
template <int BITS, int G>
inline void group_weights(const Row& r, int64_t g, typename Vec::T* w) {
  const typename Vec::T s = Vec::set1(r.scale[g]), z = Vec::set1(r.zero ? r.zero[g] : 0.0f);
  if constexpr (BITS == 4 || BITS == 5) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r.codes + g * 16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(packed, mask), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    if constexpr (BITS == 5) {
      lo = _mm_or_si128(lo, fifth_bits(r.high[g] & 0xFFFF));
      hi = _mm_or_si128(hi, fifth_bits(r.high[g] >> 16));
    }
    Vec::nibbles(lo, hi, s, z, w);
  } else {
    for (int c = 0; c < G / Vec::L; ++c) w[c] = Vec::fma(Vec::i8(r.codes + g * G + c * Vec::L), s, z);
  }
}

// Group g of one output row into the accumulators of MR activation rows. BASE offsets the
// accumulator each vector of the group feeds, so that consecutive groups use other FMA chains;
// every index is a compile-time constant once the loops unroll, so acc stays in registers.
template <int MR, int BITS, int G, int NA, int BASE>
inline void group(typename Vec::T (&acc)[MR][NA], const float* x, int64_t ldx, const Row& r,
                  int64_t g) {
  constexpr int CPG = G / Vec::L;  // vectors per group
  typename Vec::T w[CPG];
  group_weights<BITS, G>(r, g, w);
  const float* xg = x + g * G;
  for (int c = 0; c < CPG; ++c)
    for (int m = 0; m < MR; ++m)
      acc[m][(BASE + c) % NA] = Vec::fma(w[c], Vec::load(xg + m * ldx + c * Vec::L), acc[m][(BASE + c) % NA]);
}

// One output row against MR activation rows: out[m * ldo] = sum_k x[m, k] * w[k].
template <int MR, int BITS, int G>
void dot_rows(const float* x, int64_t ldx, const Row& r, int64_t K, float* out, int64_t ldo) {
  constexpr int CPG = G / Vec::L;
  constexpr int NA = MR <= 2 ? 4 : MR <= 4 ? 2 : 1;  // independent FMA chains per row
  constexpr int GPI = NA > CPG ? NA / CPG : 1;       // groups per iteration to feed them all
  typename Vec::T acc[MR][NA];
  for (int m = 0; m < MR; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = Vec::zero();
  const int64_t groups = K / G;
  int64_t g = 0;
  for (; g + GPI <= groups; g += GPI) {
    group<MR, BITS, G, NA, 0>(acc, x, ldx, r, g);
    if constexpr (GPI >= 2) group<MR, BITS, G, NA, CPG>(acc, x, ldx, r, g + 1);
    if constexpr (GPI >= 4) {
      group<MR, BITS, G, NA, 2 * CPG>(acc, x, ldx, r, g + 2);
      group<MR, BITS, G, NA, 3 * CPG>(acc, x, ldx, r, g + 3);
    }
  }
  for (; g < groups; ++g) group<MR, BITS, G, NA, 0>(acc, x, ldx, r, g);
  for (int m = 0; m < MR; ++m) {
    typename Vec::T t = acc[m][0];
    for (int a = 1; a < NA; ++a) t = Vec::add(t, acc[m][a]);
    out[m * ldo] = Vec::sum(t);
  }
}

#if LMF_SIMD == 512
// A kTileM x kTileN tile: kTileM activation rows against kTileN output rows,
// out[m * ldo + j] = x_m . w_j. Each dequantized group serves 8 rows and each x vector 2 output
// rows, so per FMA there is half an x load, against one in dot_rows: from 16 rows on, 1.3-1.4x
// faster (3072 x 576 4-bit weight, 2 threads, AVX-512: 406 vs 520 us at 16 rows, 802 vs 1114
// at 32), where a 4 x 4 tile gained less (432, 853). 16 accumulators + 4 weight vectors fit
// AVX-512's 32 registers, not AVX2's 16: that path keeps dot_rows.
constexpr int kTileM = 8, kTileN = 2;
constexpr int64_t kTileMinRows = 16;  // below it dot_rows is as fast (and for 9-15 rows faster)

template <int BITS, int G>
void tile(const float* x, int64_t ldx, const Row* rows, int64_t K, float* out, int64_t ldo) {
  constexpr int CPG = G / Vec::L;
  typename Vec::T acc[kTileM][kTileN];
  for (int m = 0; m < kTileM; ++m)
    for (int j = 0; j < kTileN; ++j) acc[m][j] = Vec::zero();
  for (int64_t g = 0; g < K / G; ++g) {
    typename Vec::T w[kTileN][CPG];
    for (int j = 0; j < kTileN; ++j) group_weights<BITS, G>(rows[j], g, w[j]);
    const float* xg = x + g * G;
    for (int c = 0; c < CPG; ++c)
      for (int m = 0; m < kTileM; ++m) {
        const typename Vec::T xv = Vec::load(xg + m * ldx + c * Vec::L);
        for (int j = 0; j < kTileN; ++j) acc[m][j] = Vec::fma(w[j][c], xv, acc[m][j]);
      }
  }
  for (int m = 0; m < kTileM; ++m)
    for (int j = 0; j < kTileN; ++j) out[m * ldo + j] = Vec::sum(acc[m][j]);
}

using TileKernel = void (*)(const float*, int64_t, const Row*, int64_t, float*, int64_t);

inline TileKernel tile_for(int64_t bits, int64_t G) {
  if (bits == 4) return tile<4, 32>;
  if (bits == 5) return tile<5, 32>;
  return G == 32 ? tile<8, 32> : tile<8, 16>;
}
#endif

using Kernel = void (*)(const float*, int64_t, const Row&, int64_t, float*, int64_t);

template <int BITS, int G>
struct Kernels {  // indexed by rows - 1
  static constexpr Kernel by_rows[kMaxRows] = {
      dot_rows<1, BITS, G>, dot_rows<2, BITS, G>, dot_rows<3, BITS, G>, dot_rows<4, BITS, G>,
      dot_rows<5, BITS, G>, dot_rows<6, BITS, G>, dot_rows<7, BITS, G>, dot_rows<8, BITS, G>};
};

inline const Kernel* kernels_for(int64_t bits, int64_t G) {
  if (bits == 4) return Kernels<4, 32>::by_rows;
  if (bits == 5) return Kernels<5, 32>::by_rows;
  return G == 32 ? Kernels<8, 32>::by_rows : Kernels<8, 16>::by_rows;
}

// Row n's dense weights: each group dequantized in registers as the kernel does, then stored.
template <int BITS, int G>
void dequantize_row(const Row& r, int64_t K, float* w) {
  constexpr int CPG = G / Vec::L;
  for (int64_t g = 0; g < K / G; ++g) {
    typename Vec::T v[CPG];
    group_weights<BITS, G>(r, g, v);
    for (int c = 0; c < CPG; ++c) Vec::store(w + g * G + c * Vec::L, v[c]);
  }
}
#endif

// The weight w[k] of one output row, for the portable path.
inline float weight_at(const Row& r, int64_t k, int64_t G, int bits) {
  const int64_t g = k / G;
  float q;
  if (bits == 8) {
    q = static_cast<float>(reinterpret_cast<const int8_t*>(r.codes)[k]);
  } else {
    const int64_t j = k % 32;
    const uint8_t byte = r.codes[g * 16 + (j % 16)];
    uint32_t code = j < 16 ? (byte & 0x0F) : (byte >> 4);
    if (bits == 5) code |= ((r.high[g] >> j) & 1u) << 4;
    q = static_cast<float>(code);
  }
  return q * r.scale[g] + (r.zero ? r.zero[g] : 0.0f);
}

}  // namespace lmf
