// Small dense matrix products and a vector exp for moescale's XLA:CPU kernels (attention.cc,
// moe_ffn.cc).
//
// The products are the ones one attention head needs on a few hundred positions: every operand
// fits in L1/L2, so there is no packing and no cache blocking, only a register tile: 6 rows x 16
// columns of C held in 12 AVX2 accumulators while k runs (per k: 2 loads of B, 6 broadcasts of
// A, 12 FMAs, the ratio that keeps both FMA ports busy). Edge tiles use masked loads and
// stores, so any M, N and K work. Without AVX2 the same loops run in scalar code.
#ifndef MOESCALE_KERNELS_SMALL_GEMM_H_
#define MOESCALE_KERNELS_SMALL_GEMM_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MOESCALE_AVX2 1
#endif

namespace moescale {

// Matrix operand views: element (r, c) of a row-major matrix with leading dimension ld, or of
// its transpose (so A^T B needs no transposed copy of A).
struct Mat {
  const float* data;
  int64_t ld;
  bool transposed = false;
  float at(int64_t r, int64_t c) const { return transposed ? data[c * ld + r] : data[r * ld + c]; }
  const float* ptr(int64_t r, int64_t c) const {
    return transposed ? data + c * ld + r : data + r * ld + c;
  }
};

#ifdef MOESCALE_AVX2

inline __m256i LaneMask(int64_t n) {  // lanes [0, n) on, n may be <= 0 or >= 8
  const int lanes = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, n)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// C[0:ROWS, 0:n] (=|+=) the register tile acc, n in (0, 16]. Masked moves only at a ragged
// edge: AMD runs vmaskmovps stores microcoded, ~10x slower than plain ones. Always inlined:
// called out of line it would take acc by address, with the same stack stores as a rolled loop
// (see PackedTile).
template <int ROWS>
__attribute__((always_inline)) inline void StoreTile(__m256 (&acc)[ROWS][2], float* C,
                                                     int64_t ldc, int64_t n, bool accumulate) {
  if (n == 16) {
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      float* c = C + r * ldc;
      if (accumulate) {
        acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(c));
        acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(c + 8));
      }
      _mm256_storeu_ps(c, acc[r][0]);
      _mm256_storeu_ps(c + 8, acc[r][1]);
    }
    return;
  }
  const __m256i m0 = LaneMask(n), m1 = LaneMask(n - 8);
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
    float* c = C + r * ldc;
    if (accumulate) {
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_maskload_ps(c, m0));
      acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_maskload_ps(c + 8, m1));
    }
    _mm256_maskstore_ps(c, m0, acc[r][0]);
    _mm256_maskstore_ps(c + 8, m1, acc[r][1]);
  }
}

// C[0:MR, 0:n] (=|+=) A[0:MR, :K] B[:K, 0:n], n in (0, 16]; B is row-major (not transposed).
template <int MR>
inline void Tile(int64_t K, const Mat& A, const float* B, int64_t ldb, float* C, int64_t ldc,
                 int64_t n, bool accumulate) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const bool full = n == 16;
  const __m256i m0 = LaneMask(n), m1 = LaneMask(n - 8);
  // A's element (r, k) sits at a_row[r] + k * a_step: one pointer per row, one stride.
  const float* a_row[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a_row[r] = A.ptr(r, 0);
  const int64_t a_step = A.transposed ? A.ld : 1;
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const __m256 b0 = full ? _mm256_loadu_ps(b) : _mm256_maskload_ps(b, m0);
    const __m256 b1 = full ? _mm256_loadu_ps(b + 8) : _mm256_maskload_ps(b + 8, m1);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(a_row[r] + k * a_step);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  StoreTile<MR>(acc, C, ldc, n, accumulate);
}

template <int MR>
inline void RowBlock(int64_t N, int64_t K, const Mat& A, const float* B, int64_t ldb, float* C,
                     int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < N; j += 16) {
    Tile<MR>(K, A, B + j, ldb, C + j, ldc, std::min<int64_t>(16, N - j), accumulate);
  }
}

#endif  // MOESCALE_AVX2

// C[M, N] = A[M, K] B[K, N] (or C += with accumulate). B row-major with leading dimension ldb.
inline void Gemm(int64_t M, int64_t N, int64_t K, const Mat& A, const float* B, int64_t ldb,
                 float* C, int64_t ldc, bool accumulate = false) {
#ifdef MOESCALE_AVX2
  constexpr int kRows = 6;
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) {
    Mat a{A.ptr(i, 0), A.ld, A.transposed};
    RowBlock<kRows>(N, K, a, B, ldb, C + i * ldc, ldc, accumulate);
  }
  Mat a{A.ptr(i, 0), A.ld, A.transposed};
  switch (M - i) {  // the last rows, fewer than kRows
    case 5: RowBlock<5>(N, K, a, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 4: RowBlock<4>(N, K, a, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 3: RowBlock<3>(N, K, a, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 2: RowBlock<2>(N, K, a, B, ldb, C + i * ldc, ldc, accumulate); break;
    case 1: RowBlock<1>(N, K, a, B, ldb, C + i * ldc, ldc, accumulate); break;
    default: break;
  }
#else
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (!accumulate) for (int64_t j = 0; j < N; ++j) c[j] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float a = A.at(i, k);
      const float* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
#endif
}

#ifdef MOESCALE_AVX2
// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block, in registers.
inline void Transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// The register tile of GemmPacked: C[0:ROWS, 0:n] (=|+=) Ap Bp over kc steps, Ap packed
// [kc][6] (one A column of the tile per step, rows past ROWS zero), Bp packed [kc][16]: both
// read strictly in sequence. ROWS is a template argument, and every loop over rows here and
// in StoreTile / Tile is unrolled by pragma: a loop left rolled indexes acc at run time, and
// GCC then keeps acc on the stack, storing it at every FMA step (a run-time row count was 2x
// slower, measured; objdump of a 6-row tile compiled out of line showed the stores even with
// the template, until the pragmas).
template <int ROWS>
inline void PackedTile(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc,
                       int64_t n, bool accumulate) {
  __m256 acc[ROWS][2];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(Bp + 16 * k), b1 = _mm256_loadu_ps(Bp + 16 * k + 8);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const __m256 a = _mm256_broadcast_ss(Ap + 6 * k + r);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  StoreTile<ROWS>(acc, C, ldc, n, accumulate);
}

inline void PackedTileRows(int64_t rows, int64_t kc, const float* Ap, const float* Bp, float* C,
                           int64_t ldc, int64_t n, bool accumulate) {
  switch (rows) {
    case 6: PackedTile<6>(kc, Ap, Bp, C, ldc, n, accumulate); break;
    case 5: PackedTile<5>(kc, Ap, Bp, C, ldc, n, accumulate); break;
    case 4: PackedTile<4>(kc, Ap, Bp, C, ldc, n, accumulate); break;
    case 3: PackedTile<3>(kc, Ap, Bp, C, ldc, n, accumulate); break;
    case 2: PackedTile<2>(kc, Ap, Bp, C, ldc, n, accumulate); break;
    case 1: PackedTile<1>(kc, Ap, Bp, C, ldc, n, accumulate); break;
    default: break;
  }
}
#endif  // MOESCALE_AVX2

// Gemm for operands beyond L1 (an expert's weights, hundreds of rows), as BLIS does it: per
// 256-deep slice of K, A is packed into 6-row panels and B into 16-column strips (each
// [256][16], 16 KiB, L1-resident while every row panel of A passes over it), so the register
// tile reads both in sequence, and a transposed view of A or B (dy w^T, x^T dy: no transposed
// copies) costs only its packing, once per operand and slice. Measured on the dev
// VM, one core, fp32: [512, 256] x [256, 512] 60-78 GFLOP/s (Gemm: 37-55), A^T B with
// A [512, 256] 52-64 (Gemm: 27-36). `pack` is the caller's scratch (grown as needed).
inline void GemmPacked(int64_t M, int64_t N, int64_t K, const Mat& A, const Mat& B, float* C,
                       int64_t ldc, bool accumulate, std::vector<float>& pack) {
#ifdef MOESCALE_AVX2
  constexpr int64_t kKc = 256, kNc = 512, kMr = 6;
  if (K == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    }
    return;
  }
  const int64_t panels = (M + kMr - 1) / kMr;
  // Grown, never shrunk: a caller reusing `pack` across calls neither reallocates nor refills.
  const size_t need = kKc * kNc + panels * kMr * kKc;
  if (pack.size() < need) pack.resize(need);
  float* Bp = pack.data();
  float* Ap = Bp + kKc * kNc;
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    for (int64_t p = 0; p < panels; ++p) {  // rows past M are zeros
      float* dst = Ap + p * kMr * kc;
      const int64_t rows = std::min(kMr, M - p * kMr);
      if (rows < kMr) std::fill(dst, dst + kMr * kc, 0.0f);
      if (A.transposed) {  // a panel column is contiguous: k outer
        for (int64_t k = 0; k < kc; ++k) {
          const float* src = A.ptr(p * kMr, k0 + k);
          for (int64_t r = 0; r < rows; ++r) dst[k * kMr + r] = src[r];
        }
      } else {             // a panel row is contiguous: r outer
        for (int64_t r = 0; r < rows; ++r) {
          const float* src = A.ptr(p * kMr + r, k0);
          for (int64_t k = 0; k < kc; ++k) dst[k * kMr + r] = src[k];
        }
      }
    }
    const bool acc = accumulate || k0 > 0;
    for (int64_t n0 = 0; n0 < N; n0 += kNc) {
      const int64_t strips = (std::min(kNc, N - n0) + 15) / 16;
      for (int64_t s = 0; s < strips; ++s) {  // columns past N are zeros
        const int64_t col = n0 + 16 * s, width = std::min<int64_t>(16, N - col);
        float* dst = Bp + s * 16 * kc;
        if (!B.transposed && width == 16) {
          const float* src = B.ptr(k0, col);
          for (int64_t k = 0; k < kc; ++k) {
            _mm256_storeu_ps(dst + 16 * k, _mm256_loadu_ps(src + k * B.ld));
            _mm256_storeu_ps(dst + 16 * k + 8, _mm256_loadu_ps(src + k * B.ld + 8));
          }
        } else if (!B.transposed) {
          const __m256i m0 = LaneMask(width), m1 = LaneMask(width - 8);
          const float* src = B.ptr(k0, col);
          for (int64_t k = 0; k < kc; ++k) {
            _mm256_storeu_ps(dst + 16 * k, _mm256_maskload_ps(src + k * B.ld, m0));
            _mm256_storeu_ps(dst + 16 * k + 8, _mm256_maskload_ps(src + k * B.ld + 8, m1));
          }
        } else {  // column c of the strip is a row of the stored matrix, read in sequence
          int64_t k = 0;
          if (width == 16) {  // 8 x 8 blocks transposed in registers
            for (; k + 8 <= kc; k += 8) {
              Transpose8x8(B.ptr(k0 + k, col), B.ld, dst + 16 * k, 16);
              Transpose8x8(B.ptr(k0 + k, col + 8), B.ld, dst + 16 * k + 8, 16);
            }
          }
          std::fill(dst + 16 * k, dst + 16 * kc, 0.0f);
          for (int64_t c = 0; c < width; ++c) {
            const float* src = B.ptr(k0, col + c);
            for (int64_t kk = k; kk < kc; ++kk) dst[16 * kk + c] = src[kk];
          }
        }
      }
      for (int64_t s = 0; s < strips; ++s) {
        const int64_t col = n0 + 16 * s, width = std::min<int64_t>(16, N - col);
        for (int64_t p = 0; p < panels; ++p) {
          PackedTileRows(std::min(kMr, M - p * kMr), kc, Ap + p * kMr * kc, Bp + s * 16 * kc,
                         C + p * kMr * ldc + col, ldc, width, acc);
        }
      }
    }
  }
#else
  (void)pack;
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      float sum = accumulate ? C[i * ldc + j] : 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += A.at(i, k) * B.at(k, j);
      C[i * ldc + j] = sum;
    }
  }
#endif
}

// dst[c, r] = src[r, c] for r < rows, c < cols (leading dimensions lds, ldd), in 16 x 16
// blocks so that both sides' cache lines are used whole.
inline void Transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst,
                      int64_t ldd) {
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB) {
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t r1 = std::min(rows, r0 + kB), c1 = std::min(cols, c0 + kB);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) dst[c * ldd + r] = src[r * lds + c];
      }
    }
  }
}

#ifdef MOESCALE_AVX2
// exp(x) on 8 lanes: Cephes' range reduction x = n ln2 + g, |g| <= ln2/2, and its degree-5
// polynomial for e^g (relative error ~2e-7, as std::exp's float within a couple of ulp).
// Inputs below -87.3 give 0 exactly (the masked scores rely on it), above 88.3 give +inf.
inline __m256 Exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                             _mm256_set1_ps(0.5f)));
  __m256 g = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  g = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), g);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(g, g), _mm256_add_ps(g, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif  // MOESCALE_AVX2

}  // namespace moescale

#endif  // MOESCALE_KERNELS_SMALL_GEMM_H_
