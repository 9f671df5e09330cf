// What moescale's XLA:CPU kernels (pkm_search.cc, pkm_gather.cc) share: includes and the
// thread split. Built on first use by moescale/kernels/cpu.py with the system C++ compiler
// against the XLA FFI headers that jaxlib ships; the Python side (layers/pkm_kernels.py)
// checks shapes and dtypes before calling, so the handlers trust them.
#ifndef MOESCALE_KERNELS_PARALLEL_H_
#define MOESCALE_KERNELS_PARALLEL_H_

#include <algorithm>
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

}  // namespace moescale

#endif  // MOESCALE_KERNELS_PARALLEL_H_
