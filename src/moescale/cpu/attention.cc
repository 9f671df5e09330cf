// Causal self-attention over packed rows for XLA:CPU, forward and backward, one (row, head) at
// a time with every intermediate in cache (model/attention_kernels.py calls these).
//
// Why: on XLA:CPU the attention core of a small LM (16 rows of 128, 4 heads of 32) ran at ~24
// GFLOP/s fwd+bwd: the scores einsum transposes q and k to [b, h, q, t] and back, the mask,
// softmax and their gradients are separate passes over [b, h, q, q], and the batched dots go to
// Eigen rather than the matmul library. Here each head's scores live in an L2-sized buffer
// between two small GEMMs (small_gemm.h), read and written in the [b, t, h, d] layout the
// projections produce, so nothing is transposed in memory at the XLA level.
//
// Semantics, as model/attention.py's XLA form: query i sees key j iff j <= i and
// segment[j] == segment[i] (packed rows; padding, segment 0, sees only padding). The full
// square of scores is computed (the FLOP count of `Attention.cost` is the full square). The
// forward keeps lse[i] = log sum_j exp(s_ij) per query; the backward recomputes the
// probabilities from it (FlashAttention's trade: one more q k^T GEMM instead of keeping
// [b, h, q, t] probabilities alive between the passes):
//   dV = P^T dO,  dP = dO V^T,  D_i = sum_j P_ij dP_ij,  dS = P (dP - D) scale,
//   dQ = dS K,  dK = dS^T Q.
//
// Shapes: q, k, v, o, dO, dq, dk, dv [..., T, H, D] float32; segments [..., T] int32;
// lse [..., H, T] float32. "..." are batch dimensions (vmap adds one).
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "parallel.h"
#include "small_gemm.h"

namespace moescale {
namespace {

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

struct Geometry {
  int64_t batch, length, heads, dim;
  int64_t padded;  // the row stride of score buffers: length rounded up to 8 lanes

  static Geometry Of(const ffi::Buffer<ffi::F32>& q) {
    const auto dims = q.dimensions();
    const int64_t r = dims.size();
    Geometry g{0, dims[r - 3], dims[r - 2], dims[r - 1], 0};
    const int64_t per_row = g.length * g.heads * g.dim;
    g.batch = per_row ? q.element_count() / per_row : 0;
    g.padded = (g.length + 7) / 8 * 8;
    return g;
  }
  int64_t ld() const { return heads * dim; }  // between positions of one head
  int64_t base(int64_t task) const {          // task = b * heads + h
    return (task / heads) * length * heads * dim + (task % heads) * dim;
  }
};

// Per-thread buffers for one head: scores (or probabilities), the backward's second [T, T]
// buffer (dP, then dS), a transposed [D, T] operand, and the row's segment ids padded to 8
// lanes. Zero-initialised: the padding columns are read (see ScoreGradRow).
struct Scratch {
  Scratch(const Geometry& g, bool backward)
      : s(g.length * g.padded), s2(backward ? g.length * g.padded : 0), t(g.dim * g.padded),
        seg(g.padded) {}
  std::vector<float> s, s2, t;
  std::vector<int32_t> seg;
};

// The softmax of one row of scores, in place: row[j] = exp(scale row[j] - lse) for the keys
// query i sees, 0 for the others (j < T). Returns lse = log sum_j exp(scale s_ij).
float SoftmaxRow(float* row, int64_t i, int64_t length, int64_t padded, const int32_t* seg,
                 float scale) {
  const int64_t n = i + 1;  // keys j <= i may be visible
#ifdef MOESCALE_AVX2
  const __m256i own = _mm256_set1_epi32(seg[i]);
  const __m256 scl = _mm256_set1_ps(scale), neg = _mm256_set1_ps(kMinusInf);
  __m256 mx = neg;
  int64_t j = 0;
  for (; j < n; j += 8) {
    const __m256i same = _mm256_cmpeq_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(seg + j)), own);
    const __m256 keep = _mm256_castsi256_ps(_mm256_and_si256(LaneMask(n - j), same));
    const __m256 x = _mm256_blendv_ps(neg, _mm256_mul_ps(_mm256_loadu_ps(row + j), scl), keep);
    _mm256_storeu_ps(row + j, x);
    mx = _mm256_max_ps(mx, x);
  }
  const float m = HorizontalMax(mx);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 total = _mm256_setzero_ps();
  for (int64_t c = 0; c < j; c += 8) {  // exp(-inf - m) is exactly 0: hidden keys drop out
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(row + c), mv));
    _mm256_storeu_ps(row + c, e);
    total = _mm256_add_ps(total, e);
  }
  const float sum = HorizontalSum(total);
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (int64_t c = 0; c < j; c += 8) {
    _mm256_storeu_ps(row + c, _mm256_mul_ps(_mm256_loadu_ps(row + c), inv));
  }
  for (; j < padded; j += 8) _mm256_storeu_ps(row + j, _mm256_setzero_ps());
  (void)length;
#else
  float m = kMinusInf;
  for (int64_t j = 0; j < length; ++j) {
    const bool keep = j < n && seg[j] == seg[i];
    row[j] = keep ? row[j] * scale : kMinusInf;
    m = std::max(m, row[j]);
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < length; ++j) {
    row[j] = row[j] == kMinusInf ? 0.0f : std::exp(row[j] - m);
    sum += row[j];
  }
  for (int64_t j = 0; j < length; ++j) row[j] /= sum;
  (void)padded;
#endif
  return m + std::log(sum);
}

// The probabilities again from the forward's lse: row[j] = exp(scale s_ij - lse), 0 if hidden.
void ProbabilityRow(float* row, int64_t i, int64_t length, int64_t padded, const int32_t* seg,
                    float scale, float lse) {
  const int64_t n = i + 1;
#ifdef MOESCALE_AVX2
  const __m256i own = _mm256_set1_epi32(seg[i]);
  const __m256 scl = _mm256_set1_ps(scale), l = _mm256_set1_ps(lse);
  const __m256 neg = _mm256_set1_ps(kMinusInf);
  int64_t j = 0;
  for (; j < n; j += 8) {
    const __m256i same = _mm256_cmpeq_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(seg + j)), own);
    const __m256 keep = _mm256_castsi256_ps(_mm256_and_si256(LaneMask(n - j), same));
    const __m256 x = _mm256_fmsub_ps(_mm256_loadu_ps(row + j), scl, l);
    _mm256_storeu_ps(row + j, Exp8(_mm256_blendv_ps(neg, x, keep)));
  }
  for (; j < padded; j += 8) _mm256_storeu_ps(row + j, _mm256_setzero_ps());
  (void)length;
#else
  for (int64_t j = 0; j < length; ++j) {
    row[j] = j < n && seg[j] == seg[i] ? std::exp(row[j] * scale - lse) : 0.0f;
  }
  (void)padded;
#endif
}

// dS = P (dP - D) scale in place of dP, D = sum_j P_ij dP_ij; 0 where P is (hidden keys).
void ScoreGradRow(const float* p, float* dp, int64_t i, int64_t length, float scale) {
  const int64_t n = i + 1;  // P is 0 beyond the diagonal
#ifdef MOESCALE_AVX2
  __m256 acc = _mm256_setzero_ps();
  // Rows are padded to 8 lanes. Past n, P is 0 and dP finite (the scratch starts zeroed and
  // its padding columns are only ever written with 0), so the padding adds nothing.
  for (int64_t j = 0; j < n; j += 8) {
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(dp + j), acc);
  }
  const __m256 d = _mm256_set1_ps(HorizontalSum(acc)), scl = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j < n; j += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(p + j),
                                   _mm256_sub_ps(_mm256_loadu_ps(dp + j), d));
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(x, scl));
  }
  for (; j < length; ++j) dp[j] = 0.0f;
#else
  float d = 0.0f;
  for (int64_t j = 0; j < n; ++j) d += p[j] * dp[j];
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d) * scale;
  for (int64_t j = n; j < length; ++j) dp[j] = 0.0f;
#endif
}

void Forward(const Geometry& g, int64_t task, const float* q, const float* k, const float* v,
             const int32_t* seg, float scale, float* o, float* lse, Scratch& w) {
  const int64_t T = g.length, D = g.dim, P = g.padded, ld = g.ld(), at = g.base(task);
  std::copy(seg + (task / g.heads) * T, seg + (task / g.heads + 1) * T, w.seg.begin());
  Transpose(T, D, k + at, ld, w.t.data(), P);                        // K^T [D, T]
  Gemm(T, T, D, Mat{q + at, ld}, w.t.data(), P, w.s.data(), P);      // S = Q K^T
  for (int64_t i = 0; i < T; ++i) {
    lse[task * T + i] = SoftmaxRow(w.s.data() + i * P, i, T, P, w.seg.data(), scale);
  }
  Gemm(T, D, T, Mat{w.s.data(), P}, v + at, ld, o + at, ld);         // O = P V
}

void Backward(const Geometry& g, int64_t task, const float* q, const float* k, const float* v,
              const int32_t* seg, const float* lse, const float* dout, float scale, float* dq,
              float* dk, float* dv, Scratch& w) {
  const int64_t T = g.length, D = g.dim, P = g.padded, ld = g.ld(), at = g.base(task);
  float* p = w.s.data();
  float* dp = w.s2.data();
  std::copy(seg + (task / g.heads) * T, seg + (task / g.heads + 1) * T, w.seg.begin());
  Transpose(T, D, k + at, ld, w.t.data(), P);
  Gemm(T, T, D, Mat{q + at, ld}, w.t.data(), P, p, P);
  for (int64_t i = 0; i < T; ++i) {
    ProbabilityRow(p + i * P, i, T, P, w.seg.data(), scale, lse[task * T + i]);
  }
  Gemm(T, D, T, Mat{p, P, /*transposed=*/true}, dout + at, ld, dv + at, ld);  // dV = P^T dO
  Transpose(T, D, v + at, ld, w.t.data(), P);
  Gemm(T, T, D, Mat{dout + at, ld}, w.t.data(), P, dp, P);                    // dP = dO V^T
  for (int64_t i = 0; i < T; ++i) ScoreGradRow(p + i * P, dp + i * P, i, T, scale);
  Gemm(T, D, T, Mat{dp, P}, k + at, ld, dq + at, ld);                         // dQ = dS K
  Gemm(T, D, T, Mat{dp, P, /*transposed=*/true}, q + at, ld, dk + at, ld);    // dK = dS^T Q
}

// Heads per extra thread: effectively one thread per call. XLA:CPU runs the calls of parallel
// microbatches side by side on its own threads, and extra threads here only competed with
// them (a head's forward is ~4 T^2 D FLOPs: 50-65 us at T 128, D 32).
constexpr int64_t kGrain = int64_t{1} << 30;

ffi::Error AttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, float scale,
                         ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  if (q.dimensions().size() < 3) return ffi::Error::InvalidArgument("attention: q rank < 3");
  const Geometry g = Geometry::Of(q);
  ParallelFor(g.batch * g.heads, kGrain, [&](int64_t begin, int64_t end) {
    Scratch w(g, /*backward=*/false);
    for (int64_t task = begin; task < end; ++task) {
      Forward(g, task, q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(), scale,
              o->typed_data(), lse->typed_data(), w);
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionGradImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                             ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, float scale,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv) {
  if (q.dimensions().size() < 3) return ffi::Error::InvalidArgument("attention: q rank < 3");
  const Geometry g = Geometry::Of(q);
  ParallelFor(g.batch * g.heads, kGrain, [&](int64_t begin, int64_t end) {
    Scratch w(g, /*backward=*/true);
    for (int64_t task = begin; task < end; ++task) {
      Backward(g, task, q.typed_data(), k.typed_data(), v.typed_data(), seg.typed_data(),
               lse.typed_data(), dout.typed_data(), scale, dq->typed_data(), dk->typed_data(),
               dv->typed_data(), w);
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace moescale

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoescaleAttention, moescale::AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoescaleAttentionGrad, moescale::AttentionGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
