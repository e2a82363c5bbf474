// Grouped few-row matmul for CPU inference, an XLA FFI custom call.
//
//   y[rows of group g] = x[rows of group g] @ W[g]
//
// x: [M, K] float32, its rows sorted by group; sizes: [G] int32, each group's row
// count (rows past their sum come out zero); w: [G, P, K, 32] float32, each group's
// [K, 32P] weight cut into P column panels of 32, each panel contiguous
// (`mixtral_jax.native.to_panels`); y: [M, 32P].
//
// Each (group, panel) pair streams its 32K weights once from memory and applies them
// to the group's rows up to eight at a time, the accumulators in registers. The
// pairs are split into one contiguous range per thread of XLA's intra-op pool, so
// each thread reads one long stream; a thread that finishes its own range takes
// what is left of the others'. Written with GCC vector types, which -march=native
// turns into AVX-512, AVX2 or NEON.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec16 __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kRows = 8;   // rows per register tile
constexpr int64_t kWidth = 32; // columns per panel: two Vec16
constexpr int64_t kPairsPerThread = 4;

// out[r, 0:32] = sum_k xt[k, r] * panel[k, 0:32] for r < rows <= R.
// xt: [K, 8] (a row chunk, transposed, zero past `rows`); panel: [K, 32]; out row stride ldo.
// Each row's sums run in k order whatever R, so a row's result does not depend on its
// neighbours. R = 8 is bound by the FMA units (16 a step of k); R = 4 takes one step of
// k per FMA latency, as fewer rows would, in half the time of R = 8.
template <int64_t R>
void PanelTile(const float* xt, const float* panel, int64_t K, float* out, int64_t ldo, int64_t rows) {
  Vec16 acc[R][2] = {};
  for (int64_t k = 0; k < K; ++k) {
    const Vec16 lo = *reinterpret_cast<const Vec16*>(panel + k * kWidth);
    const Vec16 hi = *reinterpret_cast<const Vec16*>(panel + k * kWidth + 16);
    const float* xk = xt + k * kRows;
#pragma GCC unroll 8
    for (int64_t r = 0; r < R; ++r) {
      acc[r][0] += xk[r] * lo;
      acc[r][1] += xk[r] * hi;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(out + r * ldo, &acc[r][0], sizeof(Vec16));
    std::memcpy(out + r * ldo + 16, &acc[r][1], sizeof(Vec16));
  }
}

// One call's work: the (group, panel) pairs of the groups that have rows, numbered
// group-major, in one range per thread.
struct Work {
  const float* x;
  const float* w;
  float* y;
  int64_t K, panels;
  std::vector<int64_t> start, size, first_pair;  // per group: first row, rows, first pair number
  int64_t pairs = 0;
  struct Range {
    std::atomic<int64_t> next;
    int64_t end;
  };
  std::unique_ptr<Range[]> ranges;
  int64_t num_ranges = 0;
  std::atomic<int64_t> done{0};
};

// Runs pairs until none is left, starting with range `own`.
void RunPairs(Work& work, int64_t own) {
  std::vector<float> xt;  // the current group's rows as [chunk, K, 8]
  int64_t transposed = -1;
  const int64_t K = work.K, N = work.panels * kWidth;
  for (int64_t i = 0; i < work.num_ranges; ++i) {
    Work::Range& range = work.ranges[(own + i) % work.num_ranges];
    for (int64_t pair; (pair = range.next.fetch_add(1)) < range.end;) {
      const int64_t g = std::upper_bound(work.first_pair.begin(), work.first_pair.end(), pair) -
                        work.first_pair.begin() - 1;
      const int64_t panel = pair - work.first_pair[g], n = work.size[g];
      const int64_t chunks = (n + kRows - 1) / kRows;
      if (transposed != g) {
        xt.assign(chunks * K * kRows, 0.f);
        const float* rows = work.x + work.start[g] * K;
        for (int64_t r = 0; r < n; ++r)
          for (int64_t k = 0; k < K; ++k) xt[(r / kRows * K + k) * kRows + r % kRows] = rows[r * K + k];
        transposed = g;
      }
      const float* weights = work.w + (g * work.panels + panel) * K * kWidth;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t rows = std::min(kRows, n - c * kRows);
        float* out = work.y + (work.start[g] + c * kRows) * N + panel * kWidth;
        (rows <= 4 ? PanelTile<4> : PanelTile<kRows>)(xt.data() + c * K * kRows, weights, K, out, N, rows);
      }
      work.done.fetch_add(1, std::memory_order_release);
    }
  }
}

ffi::Error GroupedRowsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> sizes,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions(), w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 4 || w_dims[3] != kWidth || w_dims[2] != x_dims[1] ||
      sizes.element_count() != static_cast<size_t>(w_dims[0]))
    return ffi::Error::InvalidArgument("grouped_rows: expected x [M, K], sizes [G], w [G, P, K, 32]");
  auto work = std::make_shared<Work>();  // shared: a pool task may start after this call returns
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->y = y->typed_data();
  work->K = x_dims[1];
  work->panels = w_dims[1];
  const int64_t rows = x_dims[0], N = work->panels * kWidth;
  int64_t at = 0;
  for (int64_t g = 0; g < w_dims[0]; ++g) {
    const int64_t n = std::clamp<int64_t>(sizes.typed_data()[g], 0, rows - at);
    work->start.push_back(at);
    work->size.push_back(n);
    work->first_pair.push_back(work->pairs);
    at += n;
    work->pairs += n ? work->panels : 0;
  }
  std::memset(work->y + at * N, 0, sizeof(float) * (rows - at) * N);  // rows in no group
  // Threads with at least kPairsPerThread pairs each: on a many-core host a decode step's
  // few pairs would otherwise cost more in scheduling than they share.
  const int64_t most = std::max<int64_t>(work->pairs / kPairsPerThread, 1);
  const int64_t threads = std::clamp<int64_t>(pool.num_threads(), 1, most);
  work->num_ranges = threads;
  work->ranges.reset(new Work::Range[threads]);
  for (int64_t t = 0; t < threads; ++t) {
    work->ranges[t].next = work->pairs * t / threads;
    work->ranges[t].end = work->pairs * (t + 1) / threads;
  }
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([work, t] { RunPairs(*work, t); });
  RunPairs(*work, 0);
  // Every pair is taken; wait for those still running on other threads.
  while (work->done.load(std::memory_order_acquire) < work->pairs) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupedRows, GroupedRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
