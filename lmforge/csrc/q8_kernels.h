// Activations quantized to int8 and multiplied with integer dot products, as llama.cpp does on
// CPUs (ggml-quants.c: quantize_row_q8_0, then ggml_vec_dot_q4_0_q8_0 and its kin).
//
// A decode step's projections are bound by instructions, not bandwidth: unpacking every 4-bit
// code into a float32 lane and multiplying in float costs ~14 vector instructions per 32 weights.
// With the activations as int8, 64 weights are one u8 x s8 dot product of 4-byte lanes
// (AVX512-VNNI vpdpbusd; AVX2 vpmaddubsw + vpmaddwd) and one float multiply-add by the lanes'
// scales: ~10 instructions per 64 weights. Measured (2 threads, AVX-512 VNNI, both builds in one
// process): SmolLM2's 120 projections at one row 4.9 ms against 8.0 in float32; its 8-bit LM head
// 1.0 against 1.2 ms. Only QuantMatrix::matmul_q8 (--int8-activations) uses this file: by default
// the activations stay float32, and outputs equal a float32 matmul up to summation order.
//
// Activation rows are quantized in groups of 32 (llama.cpp's Q8_0): d = amax / 127, and
// q = round(x * (1 / d)), half to even (0 where d is 0). models/quant_linear.py's
// quantize_activations computes the same codes in PyTorch, bit for bit, so that a quantized matmul
// here equals F.linear(quantize_activations(x), W) up to float32 summation order.

#pragma once

#include "quant_kernels.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace lmf {

constexpr int64_t kQ8Group = 32;  // activation values per int8 scale

// n zero-filled values on a 64-byte boundary: a vector load from a buffer std::vector aligns to
// 16 bytes straddles two cache lines, which cost the float32 tiles ~30% at 16 rows.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n)
      : data_(static_cast<T*>(std::aligned_alloc(64, std::max<int64_t>(64, (n * sizeof(T) + 63) / 64 * 64)))) {
    TORCH_CHECK(data_ != nullptr, "out of memory for ", n, " activation values");
    std::memset(data_, 0, n * sizeof(T));
  }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](int64_t i) { return data_[i]; }

 private:
  T* data_;
};

// M activation rows of K (a multiple of 32) as int8 codes, their scales, and the sums a weight's
// zero point multiplies.
struct Q8Rows {
  int64_t M = 0, K = 0, ld = 0;  // ld: K rounded up to 64, the codes past K are 0
  AlignedBuffer<int8_t> q;       // (M, ld)
  AlignedBuffer<float> lanes;    // (M, ld / 4): the scale of each 4-code lane (a vector's lanes)
  AlignedBuffer<float> sum16;    // (M, K / 16): d * (sum of each 16 codes)
  AlignedBuffer<float> sum32;    // (M, K / 32): d * (sum of each 32 codes)

  Q8Rows(const float* x, int64_t M_, int64_t K_)
      : M(M_), K(K_), ld((K_ + 63) / 64 * 64), q(M_ * ld), lanes(M_ * ld / 4),
        sum16(M_ * K_ / 16), sum32(M_ * K_ / 32) {
    TORCH_CHECK(K % kQ8Group == 0, "int8 activations need K a multiple of 32, got ", K);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < K / 32; ++g) quantize_group(x + m * K + g * 32, m, g);
  }

  const int8_t* codes(int64_t m) const { return q.data() + m * ld; }
  const float* lane_scales(int64_t m) const { return lanes.data() + m * (ld / 4); }

 private:
  void quantize_group(const float* x, int64_t m, int64_t g) {
    int32_t s[2];
    const float dg = quantize32(x, q.data() + m * ld + g * 32, s);
    for (int l = 0; l < 8; ++l) lanes[m * (ld / 4) + g * 8 + l] = dg;
    sum16[m * (K / 16) + 2 * g] = dg * s[0];
    sum16[m * (K / 16) + 2 * g + 1] = dg * s[1];
    sum32[m * (K / 32) + g] = dg * (s[0] + s[1]);
  }

 public:
  // 32 values to int8 codes q; returns d, and the sums of codes 0..15 and 16..31 in s; with
  // values, also the codes' values q * d there.
  static float quantize32(const float* x, int8_t* q, int32_t* s, float* values = nullptr) {
#if LMF_SIMD == 512
    const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float dg = amax / 127.0f, id = dg > 0.0f ? 1.0f / dg : 0.0f;
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));  // half to even
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(id)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(qb));
    s[0] = _mm512_reduce_add_epi32(qa);
    s[1] = _mm512_reduce_add_epi32(qb);
    if (values) {
      _mm512_storeu_ps(values, _mm512_mul_ps(_mm512_cvtepi32_ps(qa), _mm512_set1_ps(dg)));
      _mm512_storeu_ps(values + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(qb), _mm512_set1_ps(dg)));
    }
    return dg;
#elif LMF_SIMD == 256
    __m256 v[4];
    __m256 mx = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float dg = amax / 127.0f, id = dg > 0.0f ? 1.0f / dg : 0.0f;
    __m256i c[4];
    for (int i = 0; i < 4; ++i) {
      c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
      if (values) _mm256_storeu_ps(values + 8 * i, _mm256_mul_ps(_mm256_cvtepi32_ps(c[i]), _mm256_set1_ps(dg)));
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i t = _mm256_add_epi32(c[2 * h], c[2 * h + 1]);
      __m128i r = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
      r = _mm_hadd_epi32(r, r);
      s[h] = _mm_cvtsi128_si32(_mm_hadd_epi32(r, r));
    }
    // packs interleave the 128-bit lanes; the permute puts the codes back in order (llama.cpp's)
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return dg;
#else
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float dg = amax / 127.0f, id = dg > 0.0f ? 1.0f / dg : 0.0f;
    s[0] = s[1] = 0;
    for (int j = 0; j < 32; ++j) {
      q[j] = static_cast<int8_t>(std::nearbyint(x[j] * id));  // half to even, |q| <= 127
      s[j / 16] += q[j];
      if (values) values[j] = static_cast<float>(q[j]) * dg;
    }
    return dg;
#endif
  }

  // x (n, K) as the values its int8 codes stand for (q * d), into out: what the float32 kernels
  // multiply where the integer ones do not run.
  static void fake_quantize(const float* x, int64_t numel, float* out) {
    int8_t codes[32];
    int32_t s[2];
    for (int64_t i = 0; i < numel; i += 32) quantize32(x + i, codes, s, out + i);
  }
};

// sum_g zero[g] * sums[g] over one weight row's groups: the zero point's part of the dot product.
inline float zero_term(const Row& r, const float* sums, int64_t groups) {
  if (!r.zero) return 0.0f;
  float t = 0.0f;
  int64_t g = 0;
#ifdef LMF_SIMD
  typename Vec::T acc = Vec::zero();
  for (; g + Vec::L <= groups; g += Vec::L) acc = Vec::fma(Vec::load(r.zero + g), Vec::load(sums + g), acc);
  t = Vec::sum(acc);
#endif
  for (; g < groups; ++g) t += r.zero[g] * sums[g];
  return t;
}

#if LMF_SIMD == 512
// From 16 rows on, the float32 tiles on the codes' values are as fast or faster (8 activation
// rows share each dequantized weight there, against one integer product per row here).
constexpr int64_t kQ8KernelMaxRows = kTileMinRows - 1;

// u8 x s8 products of 4-byte lanes, summed into acc's int32 lanes (without VNNI: vpmaddubsw,
// which saturates above 2 * 255 * 127: callers keep the u8 side <= 128 or the s8 side small).
inline __m512i dot_lanes(__m512i acc, __m512i u, __m512i s) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

// Chunk c's 64 codes of one weight row (HALF: only the first 32, the rest 0), in K order.
template <int BITS, bool HALF>
inline __m512i chunk_codes(const Row& r, int64_t c) {
  if constexpr (BITS == 8) {
    const uint8_t* p = r.codes + c * 64;
    return HALF ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, p) : _mm512_loadu_si512(p);
  } else {
    const uint8_t* p = r.codes + c * 32;  // group 2c's 16 bytes, then group 2c + 1's
    const __m256i packed = HALF ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                                : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    // [g0, g0, g1, g1] (16 bytes each): low nibbles of the first copy, high of the second
    __m512i b = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), _mm512_castsi256_si512(packed));
    const __m512i shift = _mm512_setr_epi64(0, 0, 0x0004000400040004ll, 0x0004000400040004ll, 0, 0,
                                            0x0004000400040004ll, 0x0004000400040004ll);
    b = _mm512_and_si512(_mm512_srlv_epi16(b, shift), _mm512_set1_epi8(0x0F));
    if constexpr (BITS == 5) {
      const uint64_t h = static_cast<uint64_t>(r.high[2 * c]) |
                         (HALF ? 0ull : static_cast<uint64_t>(r.high[2 * c + 1]) << 32);
      b = _mm512_or_si512(b, _mm512_maskz_set1_epi8(h, 16));
    }
    return b;
  }
}

// The weight scale of each int32 lane of chunk c (4 lanes a group of 16, 8 a group of 32).
template <int G, bool HALF>
inline __m512 chunk_scales(const float* s) {
  if constexpr (G == 32) {
    return _mm512_mask_broadcastss_ps(_mm512_set1_ps(s[0]), 0xFF00, _mm_set_ss(HALF ? 0.0f : s[1]));
  } else {
    const __m128 four = HALF ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s))) : _mm_loadu_ps(s);
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(four));
  }
}

// Chunk c of one weight row into the accumulators of MR activation rows.
template <int MR, int BITS, int G, bool HALF>
inline void q8_chunk(__m512 (&acc)[MR], const Q8Rows& a, int64_t m0, const Row& r, int64_t c) {
  __m512i w = chunk_codes<BITS, HALF>(r, c);
  __mmask64 negative = 0;
  if constexpr (BITS == 8) {  // |w| x (x with w's sign): both operands in u8 / s8 range
    negative = _mm512_movepi8_mask(w);
    w = _mm512_abs_epi8(w);
  }
  const __m512 s = chunk_scales<G, HALF>(r.scale + c * (64 / G));
  for (int m = 0; m < MR; ++m) {
    __m512i x = _mm512_loadu_si512(a.codes(m0 + m) + c * 64);
    if constexpr (BITS == 8) x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
    const __m512 f = _mm512_cvtepi32_ps(dot_lanes(_mm512_setzero_si512(), w, x));
    acc[m] = _mm512_fmadd_ps(f, _mm512_mul_ps(s, _mm512_loadu_ps(a.lane_scales(m0 + m) + c * 16)), acc[m]);
  }
}

// One weight row against activation rows m0 .. m0 + MR - 1: out[m * ldo] = x_m . w.
template <int MR, int BITS, int G>
void q8_dot_rows(const Q8Rows& a, int64_t m0, const Row& r, float* out, int64_t ldo) {
  __m512 acc[MR], acc2[MR];
  for (int m = 0; m < MR; ++m) acc[m] = acc2[m] = _mm512_setzero_ps();
  const int64_t full = a.K / 64;
  int64_t c = 0;
  for (; c + 2 <= full; c += 2) {  // two accumulators: the multiply-adds do not wait on each other
    q8_chunk<MR, BITS, G, false>(acc, a, m0, r, c);
    q8_chunk<MR, BITS, G, false>(acc2, a, m0, r, c + 1);
  }
  if (c < full) q8_chunk<MR, BITS, G, false>(acc, a, m0, r, c);
  if (a.K % 64) q8_chunk<MR, BITS, G, true>(acc2, a, m0, r, full);
  for (int m = 0; m < MR; ++m) {
    const float* sums = G == 16 ? a.sum16.data() + (m0 + m) * (a.K / 16) : a.sum32.data() + (m0 + m) * (a.K / 32);
    out[m * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m], acc2[m])) + zero_term(r, sums, a.K / G);
  }
}
#elif LMF_SIMD == 256
constexpr int64_t kQ8KernelMaxRows = INT64_MAX;  // no tiles on AVX2

inline __m256i dot_lanes(__m256i acc, __m256i u, __m256i s) {  // see the AVX-512 version
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

template <int BITS>
inline __m256i chunk_codes(const Row& r, int64_t c) {  // group c's 32 codes, in K order
  if constexpr (BITS == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.codes + c * 32));
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r.codes + c * 16));
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m256i b = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask));
  if constexpr (BITS == 5) {  // byte j gets 16 where bit j of high is set
    const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
    __m256i h = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(r.high[c])),
                                    _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                     2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    h = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit), _mm256_set1_epi8(16));
    b = _mm256_or_si256(b, h);
  }
  return b;
}

template <int MR, int BITS, int G>
void q8_dot_rows(const Q8Rows& a, int64_t m0, const Row& r, float* out, int64_t ldo) {
  __m256 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t c = 0; c < a.K / 32; ++c) {
    __m256i w = chunk_codes<BITS>(r, c);
    const __m256i sign = w;
    if constexpr (BITS == 8) w = _mm256_sign_epi8(w, w);  // |w|, and x takes w's sign below
    const __m256 s = G == 32 ? _mm256_set1_ps(r.scale[c])
                             : _mm256_set_m128(_mm_set1_ps(r.scale[2 * c + 1]), _mm_set1_ps(r.scale[2 * c]));
    for (int m = 0; m < MR; ++m) {
      __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.codes(m0 + m) + c * 32));
      if constexpr (BITS == 8) x = _mm256_sign_epi8(x, sign);
      const __m256 f = _mm256_cvtepi32_ps(dot_lanes(_mm256_setzero_si256(), w, x));
      acc[m] = _mm256_fmadd_ps(f, _mm256_mul_ps(s, _mm256_loadu_ps(a.lane_scales(m0 + m) + c * 8)), acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    const float* sums = G == 16 ? a.sum16.data() + (m0 + m) * (a.K / 16) : a.sum32.data() + (m0 + m) * (a.K / 32);
    out[m * ldo] = Vec::sum(acc[m]) + zero_term(r, sums, a.K / G);
  }
}
#endif

#ifdef LMF_SIMD
using Q8Kernel = void (*)(const Q8Rows&, int64_t, const Row&, float*, int64_t);

template <int BITS, int G>
struct Q8Kernels {  // indexed by rows - 1
  static constexpr Q8Kernel by_rows[kMaxRows] = {
      q8_dot_rows<1, BITS, G>, q8_dot_rows<2, BITS, G>, q8_dot_rows<3, BITS, G>, q8_dot_rows<4, BITS, G>,
      q8_dot_rows<5, BITS, G>, q8_dot_rows<6, BITS, G>, q8_dot_rows<7, BITS, G>, q8_dot_rows<8, BITS, G>};
};

inline const Q8Kernel* q8_kernels_for(int64_t bits, int64_t G) {
  if (bits == 4) return Q8Kernels<4, 32>::by_rows;
  if (bits == 5) return Q8Kernels<5, 32>::by_rows;
  return G == 32 ? Q8Kernels<8, 32>::by_rows : Q8Kernels<8, 16>::by_rows;
}
#endif

}  // namespace lmf
