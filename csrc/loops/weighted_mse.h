// Span loops of tdiff::weighted_mse and its backward. Per instruction set.
#pragma once

#include "cpu_kernels.h"
#include "loops/vec_io.h"

template <typename T>
at::opmath_type<T> sum_sq_diff(const T* p, const T* q, int64_t n) {
  using IO = Io<T>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int P = IO::P;
  V acc[P];
  for (int i = 0; i < P; ++i) acc[i] = V(acc_t(0));
  for_each_step<T>(n, [&](int64_t j, int64_t count) {
    V a[P], b[P];
    IO::load(p + j, count, a);
    IO::load(q + j, count, b);  // both zero-filled past `count`: those lanes add 0
    for (int i = 0; i < P; ++i) {
      const V d = a[i] - b[i];
      acc[i] = at::vec::fmadd(d, d, acc[i]);
    }
  });
  for (int i = 1; i < P; ++i) acc[0] = acc[0] + acc[i];
  return at::vec::vec_reduce_all<acc_t>([](V& x, V& y) { return x + y; }, acc[0]);
}

template <typename T>
void scaled_diff(const T* p, const T* q, at::opmath_type<T> s, T* out, int64_t n) {
  using IO = Io<T>;
  using V = typename IO::V;
  constexpr int P = IO::P;
  const V vs(s);
  for_each_step<T>(n, [&](int64_t j, int64_t count) {
    V a[P], b[P];
    IO::load(p + j, count, a);
    IO::load(q + j, count, b);
    for (int i = 0; i < P; ++i) a[i] = vs * (a[i] - b[i]);
    IO::store(out + j, count, a);
  });
}
