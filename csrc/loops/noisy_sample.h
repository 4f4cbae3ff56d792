// Span loops of tdiff::noisy_sample and its backward. Per instruction set.
#pragma once

#include "cpu_kernels.h"
#include "loops/vec_io.h"

// Elementwise passes with one coefficient set per span, so they load and store through IoAnyOrder.
// The span's pointers are copied into locals: read through the struct, they are reloaded at every step (a store
// through T* may alias the struct as far as the compiler knows), which costs load slots in an in-cache pass.
template <typename T, bool WRITE_INPUT>
void noisy_sample_span(const tdiff::NoisySampleSpan<T>& a) {
  using IO = IoAnyOrder<T>;  // elementwise with one coefficient set: any lane order
  using V = typename IO::V;
  constexpr int P = IO::P;
  const V va(a.a), vs(a.s), vc(a.c);
  const T* x0 = a.x0;
  const T* eps = a.eps;
  T* xt = a.xt;
  T* net_in = a.net_in;
  auto step = [&](int64_t j, int64_t count) __attribute__((always_inline)) {
    V x[P], e[P];
    IO::load(x0 + j, count, x);
    IO::load(eps + j, count, e);
    for (int i = 0; i < P; ++i) x[i] = at::vec::fmadd(va, x[i], vs * e[i]);
    IO::store(xt + j, count, x);
    if constexpr (WRITE_INPUT) {
      for (int i = 0; i < P; ++i) x[i] = vc * x[i];
      IO::store(net_in + j, count, x);
    }
  };
  if constexpr (WRITE_INPUT) {
    T* const out[2] = {xt, net_in};
    for_each_step_writing<T>(a.n, out, step);
  } else {
    T* const out[1] = {xt};
    for_each_step_writing<T>(a.n, out, step);
  }
}

template <typename T>
void noisy_sample(const tdiff::NoisySampleSpan<T>& a) {
  if (a.net_in != nullptr)
    noisy_sample_span<T, true>(a);
  else
    noisy_sample_span<T, false>(a);
}

template <typename T, bool HAS_IN>
void noisy_sample_backward_span(const tdiff::NoisySampleBackwardSpan<T>& a) {
  using IO = IoAnyOrder<T>;  // elementwise with one coefficient set: any lane order
  using V = typename IO::V;
  constexpr int P = IO::P;
  const V va(a.a), vs(a.s), vc(a.c);
  const T* gxt = a.gxt;
  const T* gin = a.gin;
  T* gx0 = a.gx0;
  T* geps = a.geps;
  auto step = [&](int64_t j, int64_t count) __attribute__((always_inline)) {
    V g[P], r[P];
    IO::load(gxt + j, count, g);
    if constexpr (HAS_IN) {
      V gi[P];
      IO::load(gin + j, count, gi);
      for (int i = 0; i < P; ++i) g[i] = at::vec::fmadd(vc, gi[i], g[i]);
    }
    for (int i = 0; i < P; ++i) r[i] = va * g[i];
    IO::store(gx0 + j, count, r);
    for (int i = 0; i < P; ++i) r[i] = vs * g[i];
    IO::store(geps + j, count, r);
  };
  T* const out[2] = {gx0, geps};
  for_each_step_writing<T>(a.n, out, step);
}

template <typename T>
void noisy_sample_backward(const tdiff::NoisySampleBackwardSpan<T>& a) {
  if (a.gin != nullptr)
    noisy_sample_backward_span<T, true>(a);
  else
    noisy_sample_backward_span<T, false>(a);
}
