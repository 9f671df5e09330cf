// The grouped expert FFN of the MoE dispatch for XLA:CPU, forward and backward, gather and
// combine included (cpu/moe_ffn.py calls these; the 'fused' backend's kernels).
//
// Why: 'fused' as an XLA loop runs one while-loop iteration per block of rows, each slicing
// its expert's weights, gathering rows and scatter-adding into [t, d]; on the 2-core dev VM
// top-2 at 512 experts cost 2.0x its FLOP-matched dense layer, σ-MoE at 64 experts up to
// 2.5x. Here each expert's rows are one task: gather its tokens' rows, two GEMMs through the
// activation (small_gemm.h's GemmPacked, the weights read once per 512 rows), and the output rows
// written in sorted order; then one pass per token sums its k rows (so no two threads ever
// add into one token's row, and the sum's order is fixed: results do not depend on the
// thread count).
//
// Rows are the kept (token, choice) pairs sorted by expert: rows group_start[e] ..
// group_start[e + 1] - 1 belong to expert e, rows from group_start[E] on were dropped and are
// never read. token[r] is the row's token, weight[r] its combine weight, row_of[t, j] the row
// of pair (t, j) (>= group_start[E] when dropped).
//
//   forward:  pre[r] = x[token[r]] w_in[e] + b_in[e]
//             out[r] = weight[r] act(pre[r]) w_out[e] + weight[r] b_out[e]
//             y[t]   = sum_j out[row_of[t, j]]
//   backward (dh = dy[token] w_out[e]^T, the unweighted hidden cotangent; the outputs are not
//   kept, <act(pre), dh> + <dy, b_out> is the weight's gradient):
//             dpre = weight act'(pre) dh
//             dw_in[e] = sum_r x[token]^T dpre     dw_out[e] = sum_r (weight act(pre))^T dy
//             db_in[e] = sum_r dpre                db_out[e] = sum_r weight dy
//             dx_rows[r] = dpre w_in[e]^T;  dx[t] = sum_j dx_rows[row_of[t, j]]
// Products with a transposed operand (dy w_out^T, x^T dpre) read it through a transposed view:
// small_gemm.h's GemmPacked packs every operand before use, so no transposed copy is made.
//
// Shapes (float32 unless marked): x, dy, y, dx [T, D]; w_in [E, D, F]; w_out [E, F, D];
// b_in [E, F] or [E, 0], b_out [E, D] or [E, 0] (no biases); token [R] s32; weight [R];
// group_start [E + 1] s32; row_of [T, K] s32; pre [R, F]; out / dx_rows [R, D] (scratch
// results); dweight [R].
#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "activations.h"
#include "parallel.h"
#include "small_gemm.h"

namespace moescale {
namespace {

// Rows per GEMM: enough that an expert's weights are read once per 512 rows, few enough that
// a task's buffers stay in L2/L3 (512 x 512 floats = 1 MiB).
constexpr int64_t kChunk = 512;

struct Problem {
  int64_t T, D, F, E, R, K;
  bool bias_in, bias_out;
  int32_t activation;
  const int32_t* group_start;

  int64_t begin(int64_t e) const { return group_start[e]; }
  int64_t end(int64_t e) const { return group_start[e + 1]; }
  int64_t kept() const { return group_start[E]; }
};

ffi::Error Check(const Problem& p) {
  if (p.activation < 0 || p.activation >= kNumActivations) {
    return ffi::Error::InvalidArgument("moe_ffn: unknown activation id");
  }
  if (p.group_start[0] != 0 || p.kept() > p.R) {
    return ffi::Error::InvalidArgument("moe_ffn: group_start must run from 0 to at most R");
  }
  for (int64_t e = 0; e < p.E; ++e) {
    if (p.end(e) < p.begin(e)) {
      return ffi::Error::InvalidArgument("moe_ffn: group_start must be non-decreasing");
    }
  }
  return ffi::Error::Success();
}

Problem Describe(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w_in,
                 const ffi::Buffer<ffi::F32>& b_in, const ffi::Buffer<ffi::F32>& b_out,
                 const ffi::Buffer<ffi::S32>& token, const ffi::Buffer<ffi::S32>& group_start,
                 const ffi::Buffer<ffi::S32>& row_of, int32_t activation) {
  const auto wd = w_in.dimensions();
  Problem p;
  p.T = x.dimensions()[0];
  p.D = wd[1];
  p.F = wd[2];
  p.E = wd[0];
  p.R = token.element_count();
  p.K = p.T ? row_of.element_count() / p.T : 0;
  p.bias_in = b_in.element_count() > 0;
  p.bias_out = b_out.element_count() > 0;
  p.activation = activation;
  p.group_start = group_start.typed_data();
  return p;
}

// A thread's buffers, reused by every task it runs (a call's worker threads run many tasks;
// the calling thread keeps its own between calls, a few MiB). Allocated and zero-filled per
// task instead, they cost ~0.8 MB of memset per expert in the forward at 512 experts.
struct Scratch {
  std::vector<float> a, b, c, d, pack;
};

// v's data, grown to at least n floats (never shrunk, so never refilled).
float* Floats(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

void GatherRows(const float* src, int64_t d, const int32_t* token, int64_t rows, float* dst) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * d, src + token[i] * d, d * 4);
}

// dst[t] = sum_j rows[row_of[t, j]] over kept rows, tokens split over the threads.
void CombineRows(const Problem& p, const int32_t* row_of, const float* rows, float* dst) {
  ParallelFor(p.T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* out = dst + t * p.D;
      std::fill(out, out + p.D, 0.0f);
      for (int64_t j = 0; j < p.K; ++j) {
        const int64_t r = row_of[t * p.K + j];
        if (r < 0 || r >= p.kept()) continue;
        const float* src = rows + r * p.D;
        for (int64_t c = 0; c < p.D; ++c) out[c] += src[c];
      }
    }
  });
}

// Tasks: (expert, chunk of at most kChunk rows), in expert order.
std::vector<std::pair<int64_t, int64_t>> Chunks(const Problem& p) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t e = 0; e < p.E; ++e) {
    for (int64_t a = p.begin(e); a < p.end(e); a += kChunk) chunks.emplace_back(e, a);
  }
  return chunks;
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_in,
                       ffi::Buffer<ffi::F32> w_out, ffi::Buffer<ffi::F32> b_in,
                       ffi::Buffer<ffi::F32> b_out, ffi::Buffer<ffi::S32> token,
                       ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::S32> group_start,
                       ffi::Buffer<ffi::S32> row_of, int32_t activation,
                       ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> pre,
                       ffi::ResultBuffer<ffi::F32> out) {
  const Problem p = Describe(x, w_in, b_in, b_out, token, group_start, row_of, activation);
  if (auto err = Check(p); err.failure()) return err;
  const int64_t D = p.D, F = p.F;
  const auto chunks = Chunks(p);
  const int32_t* tok = token.typed_data();
  const float* wt = weight.typed_data();
  ParallelTasks(static_cast<int64_t>(chunks.size()), [&](int64_t task) {
    const auto [e, a] = chunks[task];
    const int64_t rows = std::min(kChunk, p.end(e) - a);
    thread_local Scratch s;
    float* xb = Floats(s.a, rows * D);
    float* hw = Floats(s.b, rows * F);
    GatherRows(x.typed_data(), D, tok + a, rows, xb);
    float* pr = pre->typed_data() + a * F;
    GemmPacked(rows, F, D, Mat{xb, D}, Mat{w_in.typed_data() + e * D * F, F}, pr, F, false,
               s.pack);
    for (int64_t i = 0; i < rows; ++i) {
      if (p.bias_in) {
        const float* b = b_in.typed_data() + e * F;
        for (int64_t c = 0; c < F; ++c) pr[i * F + c] += b[c];
      }
      // Weighted before the out-projection: a [rows, f] product instead of [rows, d].
      ActivateRow(p.activation, pr + i * F, wt[a + i], F, hw + i * F);
    }
    float* o = out->typed_data() + a * D;
    GemmPacked(rows, D, F, Mat{hw, F}, Mat{w_out.typed_data() + e * F * D, D}, o, D, false,
               s.pack);
    if (p.bias_out) {
      const float* b = b_out.typed_data() + e * D;
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t c = 0; c < D; ++c) o[i * D + c] += wt[a + i] * b[c];
      }
    }
  });
  CombineRows(p, row_of.typed_data(), out->typed_data(), y->typed_data());
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::F32> w_in, ffi::Buffer<ffi::F32> w_out,
                        ffi::Buffer<ffi::F32> b_in, ffi::Buffer<ffi::F32> b_out,
                        ffi::Buffer<ffi::S32> token, ffi::Buffer<ffi::F32> weight,
                        ffi::Buffer<ffi::S32> group_start, ffi::Buffer<ffi::S32> row_of,
                        ffi::Buffer<ffi::F32> pre, int32_t activation,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dweight,
                        ffi::ResultBuffer<ffi::F32> dw_in, ffi::ResultBuffer<ffi::F32> dw_out,
                        ffi::ResultBuffer<ffi::F32> db_in, ffi::ResultBuffer<ffi::F32> db_out,
                        ffi::ResultBuffer<ffi::F32> dx_rows) {
  const Problem p = Describe(x, w_in, b_in, b_out, token, group_start, row_of, activation);
  if (auto err = Check(p); err.failure()) return err;
  const int64_t D = p.D, F = p.F;
  const int32_t* tok = token.typed_data();
  const float* wt = weight.typed_data();
  float* dwt = dweight->typed_data();
  std::fill(dwt + p.kept(), dwt + p.R, 0.0f);  // dropped rows: no gradient
  // One task per expert: its weight gradients are summed by one thread, chunk after chunk, so
  // no two threads add into one expert's gradient (nor in a thread-dependent order). The
  // largest experts go first (a trained router is uneven): the last task to start is short.
  std::vector<int64_t> by_size(p.E);
  std::iota(by_size.begin(), by_size.end(), 0);
  std::stable_sort(by_size.begin(), by_size.end(), [&p](int64_t a, int64_t b) {
    return p.end(a) - p.begin(a) > p.end(b) - p.begin(b);
  });
  ParallelTasks(p.E, [&](int64_t task) {
    const int64_t e = by_size[task];
    float* gi = dw_in->typed_data() + e * D * F;
    float* go = dw_out->typed_data() + e * F * D;
    float* gbi = p.bias_in ? db_in->typed_data() + e * F : nullptr;
    float* gbo = p.bias_out ? db_out->typed_data() + e * D : nullptr;
    if (gbi) std::fill(gbi, gbi + F, 0.0f);
    if (gbo) std::fill(gbo, gbo + D, 0.0f);
    if (p.end(e) == p.begin(e)) {  // no rows: zero gradients
      std::fill(gi, gi + D * F, 0.0f);
      std::fill(go, go + F * D, 0.0f);
      return;
    }
    const Mat wi_t{w_in.typed_data() + e * D * F, F, true};   // w_in[e]^T  [F, D]
    const Mat wo_t{w_out.typed_data() + e * F * D, D, true};  // w_out[e]^T [D, F]
    const int64_t most = std::min(kChunk, p.end(e) - p.begin(e));
    thread_local Scratch s;
    float* xb = Floats(s.a, most * D);
    float* dyb = Floats(s.b, most * D);
    float* dh = Floats(s.c, most * F);
    float* hw = Floats(s.d, most * F);
    for (int64_t a = p.begin(e); a < p.end(e); a += kChunk) {
      const int64_t rows = std::min(kChunk, p.end(e) - a);
      const bool first = a == p.begin(e);
      GatherRows(x.typed_data(), D, tok + a, rows, xb);
      GatherRows(dy.typed_data(), D, tok + a, rows, dyb);
      GemmPacked(rows, F, D, Mat{dyb, D}, wo_t, dh, F, false, s.pack);
      for (int64_t i = 0; i < rows; ++i) {
        float g = ActivateRowGrad(p.activation, pre.typed_data() + (a + i) * F, wt[a + i], F,
                                  hw + i * F, dh + i * F);  // dh -> dpre
        if (gbo) {
          const float* b = b_out.typed_data() + e * D;
          for (int64_t c = 0; c < D; ++c) {
            g += dyb[i * D + c] * b[c];
            gbo[c] += wt[a + i] * dyb[i * D + c];
          }
        }
        if (gbi) {
          for (int64_t c = 0; c < F; ++c) gbi[c] += dh[i * F + c];
        }
        dwt[a + i] = g;
      }
      // dw_in[e] += x^T dpre, dw_out[e] += (weight act(pre))^T dy, dx_rows = dpre w_in[e]^T.
      GemmPacked(D, F, rows, Mat{xb, D, true}, Mat{dh, F}, gi, F, !first, s.pack);
      GemmPacked(F, D, rows, Mat{hw, F, true}, Mat{dyb, D}, go, D, !first, s.pack);
      GemmPacked(rows, D, F, Mat{dh, F}, wi_t, dx_rows->typed_data() + a * D, D, false, s.pack);
    }
  });
  CombineRows(p, row_of.typed_data(), dx_rows->typed_data(), dx->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace moescale

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoescaleMoeFfn, moescale::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_in
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_in
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_out
                                  .Arg<ffi::Buffer<ffi::S32>>()   // token
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weight
                                  .Arg<ffi::Buffer<ffi::S32>>()   // group_start
                                  .Arg<ffi::Buffer<ffi::S32>>()   // row_of
                                  .Attr<int32_t>("activation")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Ret<ffi::Buffer<ffi::F32>>()   // pre
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out (rows)
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoescaleMoeFfnGrad, moescale::BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_in
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_in
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_out
                                  .Arg<ffi::Buffer<ffi::S32>>()   // token
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weight
                                  .Arg<ffi::Buffer<ffi::S32>>()   // group_start
                                  .Arg<ffi::Buffer<ffi::S32>>()   // row_of
                                  .Arg<ffi::Buffer<ffi::F32>>()   // pre
                                  .Attr<int32_t>("activation")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dweight
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw_in
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dw_out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // db_in
                                  .Ret<ffi::Buffer<ffi::F32>>()   // db_out
                                  .Ret<ffi::Buffer<ffi::F32>>()); // dx_rows
