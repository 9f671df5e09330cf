// What moescale's XLA:CPU kernels (pkm_search.cc, pkm_gather.cc, attention.cc, moe_ffn.cc)
// share: includes and the thread split. Built on first use by moescale/cpu/build.py with the
// system C++ compiler against the XLA FFI headers that jaxlib ships; the Python side
// (cpu/pkm.py, cpu/attention.py, cpu/moe_ffn.py) checks
// shapes and dtypes before calling, so the handlers trust them.
#ifndef MOESCALE_KERNELS_PARALLEL_H_
#define MOESCALE_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace moescale {

namespace ffi = xla::ffi;

// Runs f(begin, end) on [0, n) split over up to hardware_concurrency threads, each getting at
// least `grain` items (small calls stay on the calling thread: a thread start costs ~20 us).
template <typename F>
void ParallelFor(int64_t n, int64_t grain, const F& f) {
  int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  threads = std::max<int64_t>(1, std::min(threads, n / std::max<int64_t>(1, grain)));
  const int64_t per = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  for (int64_t p = 1; p < threads; ++p) {
    pool.emplace_back([&f, p, per, n] { f(p * per, std::min(n, (p + 1) * per)); });
  }
  f(0, std::min(n, per));
  for (auto& th : pool) th.join();
}

// Runs f(task) for every task in [0, n) on up to hardware_concurrency threads that take the
// next task as they finish one: for tasks of uneven size (experts with few or many rows),
// where ParallelFor's equal split would leave a thread idle.
template <typename F>
void ParallelTasks(int64_t n, const F& f) {
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), n));
  std::atomic<int64_t> next{0};
  auto work = [&f, &next, n] {
    for (int64_t task = next++; task < n; task = next++) f(task);
  };
  std::vector<std::thread> pool;
  for (int64_t p = 1; p < threads; ++p) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
}

}  // namespace moescale

#endif  // MOESCALE_KERNELS_PARALLEL_H_
