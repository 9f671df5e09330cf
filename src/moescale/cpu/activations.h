// The FFN activations of moescale's layers (layers/common.py) and their derivatives, on rows of
// floats, for moe_ffn.cc. Ids as cpu/moe_ffn.py passes them:
//   0 relu   1 gelu (exact, erf form)   2 gelu_tanh   3 silu
// Vector forms run 8 lanes with small_gemm.h's Exp8; the tail of a row (and a build without
// AVX2) uses the scalar forms of the same formulas. erf is Abramowitz & Stegun 7.1.26 (absolute
// error <= 1.5e-7, about float32's own rounding at 1), tanh is 1 - 2 / (exp(2u) + 1).
#ifndef MOESCALE_KERNELS_ACTIVATIONS_H_
#define MOESCALE_KERNELS_ACTIVATIONS_H_

#include <cmath>
#include <cstdint>

#include "small_gemm.h"

namespace moescale {

enum Activation : int32_t { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };
constexpr int32_t kNumActivations = 4;

namespace act {

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kCubic = 0.044715f;

// A&S 7.1.26 coefficients: erf(z) = 1 - t (a1 + t (a2 + ... a5)) exp(-z^2), t = 1 / (1 + p z).
constexpr float kP = 0.3275911f, kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f,
                kA4 = -1.453152027f, kA5 = 1.061405429f;

// value and derivative of the activation at x (scalar).
inline void Scalar(int32_t kind, float x, float* value, float* grad) {
  switch (kind) {
    case kRelu:
      *value = x > 0.0f ? x : 0.0f;
      *grad = x > 0.0f ? 1.0f : 0.0f;
      return;
    case kGelu: {
      const float cdf = 0.5f * (1.0f + std::erf(x * kSqrtHalf));
      *value = x * cdf;
      *grad = cdf + x * kInvSqrt2Pi * std::exp(-0.5f * x * x);
      return;
    }
    case kGeluTanh: {
      const float u = kSqrt2OverPi * (x + kCubic * x * x * x);
      const float th = std::tanh(u);
      *value = 0.5f * x * (1.0f + th);
      *grad = 0.5f * (1.0f + th) +
              0.5f * x * (1.0f - th * th) * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x * x);
      return;
    }
    default: {  // kSilu
      const float s = 1.0f / (1.0f + std::exp(-x));
      *value = x * s;
      *grad = s * (1.0f + x * (1.0f - s));
      return;
    }
  }
}

#ifdef MOESCALE_AVX2
inline __m256 Erf8(__m256 z) {
  const __m256 sign = _mm256_and_ps(z, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(kP), a, one));
  __m256 p = _mm256_set1_ps(kA5);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(kA4));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(kA3));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(kA2));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(kA1));
  p = _mm256_mul_ps(p, t);
  const __m256 e = Exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
  return _mm256_or_ps(sign, _mm256_fnmadd_ps(p, e, one));  // sign * (1 - p e)
}

// 8 lanes: value and derivative.
inline void Vector(int32_t kind, __m256 x, __m256* value, __m256* grad) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  switch (kind) {
    case kRelu: {
      const __m256 pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ);
      *value = _mm256_and_ps(pos, x);
      *grad = _mm256_and_ps(pos, one);
      return;
    }
    case kGelu: {
      const __m256 cdf = _mm256_mul_ps(
          half, _mm256_add_ps(one, Erf8(_mm256_mul_ps(x, _mm256_set1_ps(kSqrtHalf)))));
      const __m256 pdf = _mm256_mul_ps(
          _mm256_set1_ps(kInvSqrt2Pi),
          Exp8(_mm256_mul_ps(_mm256_set1_ps(-0.5f), _mm256_mul_ps(x, x))));
      *value = _mm256_mul_ps(x, cdf);
      *grad = _mm256_fmadd_ps(x, pdf, cdf);
      return;
    }
    case kGeluTanh: {
      const __m256 x2 = _mm256_mul_ps(x, x);
      const __m256 u = _mm256_mul_ps(_mm256_set1_ps(kSqrt2OverPi),
                                     _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kCubic), x2),
                                                     x, x));
      const __m256 th = _mm256_sub_ps(
          one, _mm256_div_ps(_mm256_set1_ps(2.0f),
                             _mm256_add_ps(Exp8(_mm256_add_ps(u, u)), one)));
      const __m256 du = _mm256_mul_ps(
          _mm256_set1_ps(kSqrt2OverPi),
          _mm256_fmadd_ps(_mm256_set1_ps(3.0f * kCubic), x2, one));
      const __m256 hx = _mm256_mul_ps(half, x);
      *value = _mm256_fmadd_ps(hx, th, hx);
      *grad = _mm256_fmadd_ps(_mm256_mul_ps(hx, _mm256_fnmadd_ps(th, th, one)), du,
                              _mm256_mul_ps(half, _mm256_add_ps(one, th)));
      return;
    }
    default: {  // kSilu
      const __m256 s = _mm256_div_ps(
          one, _mm256_add_ps(one, Exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
      *value = _mm256_mul_ps(x, s);
      *grad = _mm256_mul_ps(s, _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one));
      return;
    }
  }
}
#endif  // MOESCALE_AVX2

}  // namespace act

// Forward of n values: out[i] = scale * act(x[i]).
inline void ActivateRow(int32_t kind, const float* x, float scale, int64_t n, float* out) {
  int64_t i = 0;
#ifdef MOESCALE_AVX2
  const __m256 s = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    __m256 v, g;
    act::Vector(kind, _mm256_loadu_ps(x + i), &v, &g);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, v));
  }
#endif
  for (; i < n; ++i) {
    float v, g;
    act::Scalar(kind, x[i], &v, &g);
    out[i] = scale * v;
  }
}

// Backward of n values with upstream gradient dh (unweighted) and the row's weight w:
//   h_w[i] = w act(x[i]);  dx[i] = w act'(x[i]) dh[i]  (in place of dh);  returns <act(x), dh>.
inline float ActivateRowGrad(int32_t kind, const float* x, float w, int64_t n, float* h_w,
                             float* dh) {
  int64_t i = 0;
  float dot = 0.0f;
#ifdef MOESCALE_AVX2
  const __m256 ws = _mm256_set1_ps(w);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 v, g;
    act::Vector(kind, _mm256_loadu_ps(x + i), &v, &g);
    const __m256 d = _mm256_loadu_ps(dh + i);
    acc = _mm256_fmadd_ps(v, d, acc);
    _mm256_storeu_ps(h_w + i, _mm256_mul_ps(ws, v));
    _mm256_storeu_ps(dh + i, _mm256_mul_ps(_mm256_mul_ps(ws, g), d));
  }
  dot = HorizontalSum(acc);
#endif
  for (; i < n; ++i) {
    float v, g;
    act::Scalar(kind, x[i], &v, &g);
    dot += v * dh[i];
    h_w[i] = w * v;
    dh[i] = w * g * dh[i];
  }
  return dot;
}

}  // namespace moescale

#endif  // MOESCALE_KERNELS_ACTIVATIONS_H_
