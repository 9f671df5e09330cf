// XLA:CPU kernels (jax.ffi handlers) for the sparse product-key memory's value read: the
// gather-reduce of the forward pass, and the gathered dot and scatter-add of its backward.
//
// Why hand-written: at 16k tokens (4 heads, knn 32, d 256, 2-core dev VM) XLA's gathers read
// ~10 GB/s of 1 KB rows from a 16 MB table that sits in L3: the row loads are latency-bound.
// Here tokens (or table rows) are split between threads and every gather prefetches the row
// it will read kPrefetch steps ahead. Measured figures: docs/performance.md.
//
// Shapes (row-major, f32 unless noted): values [r, d]; idx [t, s] int32 (the caller clips to
// [0, r)); w [t, s]; y, dy [t, d].

#include <cstring>

#include "parallel.h"

namespace moescale {
namespace {

constexpr int64_t kPrefetch = 4;     // rows ahead (2 / 4 / 8: 142 / 116 / 126 ms forward)
constexpr int64_t kScatterPrefetch = 8;  // entries ahead (4 / 8 / 16: 192 / 115-135 / 189 ms)
constexpr int64_t kLanes = 8;        // partial sums of a dot: one AVX register of f32

inline void PrefetchRow(const float* row, int64_t d) {
  for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(row + c, 0, 3);  // 64-byte lines
}

// <a, b> over d floats with kLanes independent partial sums, so the compiler vectorises it
// without -ffast-math (a single running sum is a serial dependency chain).
inline float Dot(const float* a, const float* b, int64_t d) {
  float lanes[kLanes] = {0};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[c + l] * b[c + l];
  }
  float sum = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; c < d; ++c) sum += a[c] * b[c];
  return sum;
}

// Calls f(token, flat slot j = token * s + slot, value row, d) for every slot of every token
// of idx [t, s], tokens split between threads, each thread prefetching the row kPrefetch slots
// ahead.
template <typename F>
void ForEachRow(const ffi::Buffer<ffi::F32>& values, const ffi::Buffer<ffi::S32>& idx,
                const F& f) {
  const int64_t d = values.dimensions().back();
  const int64_t s = idx.dimensions().back();
  const int64_t t = s ? idx.element_count() / s : 0;
  const float* table = values.typed_data();
  const int32_t* ix = idx.typed_data();
  ParallelFor(t, 64, [&](int64_t begin, int64_t end) {
    const int64_t last = end * s;
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = i * s; j < (i + 1) * s; ++j) {
        if (j + kPrefetch < last) PrefetchRow(table + int64_t{ix[j + kPrefetch]} * d, d);
        f(i, j, table + int64_t{ix[j]} * d, d);
      }
    }
  });
}

// y[t] = sum_s w[t, s] * values[idx[t, s]]
ffi::Error GatherReduceImpl(ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> idx,
                            ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const float* wt = w.typed_data();
  float* out = y->typed_data();
  std::memset(out, 0, y->element_count() * sizeof(float));
  ForEachRow(values, idx, [&](int64_t i, int64_t j, const float* row, int64_t d) {
    float* yr = out + i * d;
    const float wj = wt[j];
    for (int64_t c = 0; c < d; ++c) yr[c] += wj * row[c];
  });
  return ffi::Error::Success();
}

// dw[t, s] = <dy[t], values[idx[t, s]]>
ffi::Error GatherDotImpl(ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> idx,
                         ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  const float* g = dy.typed_data();
  float* out = dw->typed_data();
  ForEachRow(values, idx, [&](int64_t i, int64_t j, const float* row, int64_t d) {
    out[j] = Dot(g + i * d, row, d);
  });
  return ffi::Error::Success();
}

// dv[r] = sum over (t, s) with idx[t, s] == r of w[t, s] * dy[t]. Each thread owns a range of
// table rows and scans every index: no two threads write one row, and a row's sum runs in
// token order whatever the thread count (deterministic). The read-modify-write of a random
// 1 KB output row is what costs, so the row kPrefetch entries ahead is prefetched for writing
// when this thread owns it. Rows outside [0, r) are skipped.
ffi::Error ScatterAddImpl(ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> w,
                          ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dv) {
  const int64_t d = dy.dimensions().back();
  const int64_t r = d ? dv->element_count() / d : 0;
  const int64_t s = idx.dimensions().back();
  const int64_t entries = idx.element_count();
  const int32_t* ix = idx.typed_data();
  const float* wt = w.typed_data();
  const float* g = dy.typed_data();
  float* out = dv->typed_data();
  ParallelFor(r, 256, [&](int64_t lo, int64_t hi) {
    std::memset(out + lo * d, 0, (hi - lo) * d * sizeof(float));
    for (int64_t j = 0; j < entries; ++j) {
      if (j + kScatterPrefetch < entries) {
        const int64_t ahead = ix[j + kScatterPrefetch];
        if (ahead >= lo && ahead < hi) {
          for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(out + ahead * d + c, 1, 3);
        }
      }
      const int64_t row = ix[j];
      if (row < lo || row >= hi) continue;
      const float wj = wt[j];
      const float* gi = g + (j / s) * d;
      float* o = out + row * d;
      for (int64_t c = 0; c < d; ++c) o[c] += wj * gi[c];
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace moescale

namespace ffi = xla::ffi;

// Both gathers take (values, idx, a float [t, ...] operand) and return one float buffer.
static auto GatherBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoescaleGatherReduce, moescale::GatherReduceImpl, GatherBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoescaleGatherDot, moescale::GatherDotImpl, GatherBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoescaleScatterAdd, moescale::ScatterAddImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

