// Span loops of tdiff::multistep_update (see csrc/cpu_kernels.h for the maths). Per instruction set.
#pragma once

#include "cpu_kernels.h"
#include "loops/vec_io.h"

// The span loop keeps every coefficient and pointer in a local whose address never leaves this function: the
// step is forced inline at each of its call sites (for_each_step's lambda was left out of line for the tail, so
// its captures escaped, and the compiler then reloaded the coefficient vectors from the stack after each store
// through T*, which may alias them: in cache those reloads cost as much as the data's own loads). SRC_IS_X: the
// network saw x itself (src == x), so the conversion reuses x's vector instead of loading it a second time.
template <typename T, int K, bool CFG, bool CONVERT, bool SRC_IS_X>
void multistep_span(const tdiff::MultistepSpan<T>& a) {
  using IO = IoAnyOrder<T>;  // elementwise with one coefficient set per span: any lane order
  using V = typename IO::V;
  constexpr int P = IO::P;
  V c[K + 1];
  for (int k = 0; k <= K; ++k) c[k] = V(a.c[k]);
  const V w(a.w), p(a.p), q(a.q);
  const T* xp = a.x;
  const T* up = a.uncond;
  const T* sp = a.src;
  T* out = a.out;
  T* h0 = a.h0;
  const T* hp[K];
  for (int k = 0; k < K; ++k) hp[k] = a.h[k];
  auto step = [&](int64_t j, int64_t count) __attribute__((always_inline)) {
    V x[P], m[P], acc[P];
    IO::load(xp + j, count, x);
    IO::load(hp[0] + j, count, m);
    if constexpr (CFG) {
      V u[P];
      IO::load(up + j, count, u);
      for (int i = 0; i < P; ++i) m[i] = at::vec::fmadd(w, m[i] - u[i], u[i]);
    }
    if constexpr (CONVERT) {
      if constexpr (SRC_IS_X) {
        for (int i = 0; i < P; ++i) m[i] = at::vec::fmadd(p, x[i], q * m[i]);
      } else {
        V s[P];
        IO::load(sp + j, count, s);
        for (int i = 0; i < P; ++i) m[i] = at::vec::fmadd(p, s[i], q * m[i]);
      }
    }
    for (int i = 0; i < P; ++i) acc[i] = at::vec::fmadd(c[1], m[i], c[0] * x[i]);
    for (int k = 1; k < K; ++k) {
      V h[P];
      IO::load(hp[k] + j, count, h);
      for (int i = 0; i < P; ++i) acc[i] = at::vec::fmadd(c[k + 1], h[i], acc[i]);
    }
    IO::store(out + j, count, acc);
    if constexpr (CFG || CONVERT) IO::store(h0 + j, count, m);
  };
  if constexpr (CFG || CONVERT) {
    T* const outs[2] = {out, h0};
    for_each_step_writing<T>(a.n, outs, step);
  } else {
    T* const outs[1] = {out};
    for_each_step_writing<T>(a.n, outs, step);
  }
}

template <typename T, int K>
void multistep_mode(const tdiff::MultistepSpan<T>& a) {
  if (a.convert && a.src == a.x) {
    if (a.cfg)
      multistep_span<T, K, true, true, true>(a);
    else
      multistep_span<T, K, false, true, true>(a);
  } else if (a.cfg && a.convert) {
    multistep_span<T, K, true, true, false>(a);
  } else if (a.cfg) {
    multistep_span<T, K, true, false, false>(a);
  } else if (a.convert) {
    multistep_span<T, K, false, true, false>(a);
  } else {
    multistep_span<T, K, false, false, false>(a);
  }
}

template <typename T>
void multistep(const tdiff::MultistepSpan<T>& a) {
  switch (a.k) {
    case 1: multistep_mode<T, 1>(a); break;
    case 2: multistep_mode<T, 2>(a); break;
    case 3: multistep_mode<T, 3>(a); break;
    default: multistep_mode<T, 4>(a); break;
  }
}

template <typename T, int K>
void multistep_backward_k(const tdiff::MultistepBackwardSpan<T>& a) {
  using IO = Io<T>;  // memory order: the dot products' lane sums must not change with the instruction set's layout
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int P = IO::P;
  V c[K + 1], d[K + 1];
  for (int k = 0; k <= K; ++k) {
    c[k] = V(a.c[k]);
    d[k] = V(acc_t(0));
  }
  const T* gp = a.g;
  const T* xp = a.x;
  T* gx = a.gx;
  const T* hp[K];
  T* ghp[K];
  for (int k = 0; k < K; ++k) {
    hp[k] = a.h[k];
    ghp[k] = a.gh[k];
  }
  for_each_step<T>(a.n, [&](int64_t j, int64_t count) {
    V g[P], t[P], r[P];
    IO::load(gp + j, count, g);
    IO::load(xp + j, count, t);  // zero-filled past `count`: the dot products ignore those lanes
    for (int i = 0; i < P; ++i) {
      d[0] = at::vec::fmadd(g[i], t[i], d[0]);
      r[i] = c[0] * g[i];
    }
    IO::store(gx + j, count, r);
    for (int k = 0; k < K; ++k) {
      IO::load(hp[k] + j, count, t);
      for (int i = 0; i < P; ++i) {
        d[k + 1] = at::vec::fmadd(g[i], t[i], d[k + 1]);
        r[i] = c[k + 1] * g[i];
      }
      IO::store(ghp[k] + j, count, r);
    }
  });
  for (int k = 0; k <= K; ++k) a.dots[k] = at::vec::vec_reduce_all<acc_t>([](V& x, V& y) { return x + y; }, d[k]);
}

template <typename T>
void multistep_backward(const tdiff::MultistepBackwardSpan<T>& a) {
  switch (a.k) {
    case 1: multistep_backward_k<T, 1>(a); break;
    case 2: multistep_backward_k<T, 2>(a); break;
    case 3: multistep_backward_k<T, 3>(a); break;
    default: multistep_backward_k<T, 4>(a); break;
  }
}
