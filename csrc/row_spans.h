// How the CPU kernels split per-sample work: the flattened (batch, n) data is cut into spans of at most `chunk`
// elements that never cross a sample boundary, so each span has one sample's coefficients; the spans run in
// parallel through at::parallel_for. fn(task, b, lo, len): task in [0, batch * spans_per_sample), b the sample,
// [lo, lo + len) the flat element range. `task` lets a kernel write one partial result per span.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace tdiff {

// Span length for the kernels that reduce per sample: small batches of large images still use every thread.
constexpr int64_t kSpanChunk = 16384;

inline int64_t spans_per_sample(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

template <typename F>
inline void parallel_row_spans(int64_t batch, int64_t n, int64_t chunk, const F& fn) {
  const int64_t spans = spans_per_sample(n, chunk);
  at::parallel_for(0, batch * spans, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / spans;
      const int64_t lo = b * n + (task % spans) * chunk;
      fn(task, b, lo, std::min(chunk, (b + 1) * n - lo));
    }
  });
}

// Per-sample totals of per-span partial results (`width` values per span, laid out task by task), added span by
// span in a fixed order, so a reduction does not depend on the thread count.
template <typename T>
inline void sum_span_partials(const T* partial, int64_t batch, int64_t spans, int64_t width, T* out) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t k = 0; k < width; ++k) {
      T s = 0;
      for (int64_t c = 0; c < spans; ++c) s += partial[(b * spans + c) * width + k];
      out[b * width + k] = s;
    }
}

}  // namespace tdiff
