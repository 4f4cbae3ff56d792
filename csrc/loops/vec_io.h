// Loads and stores of one vector step of any floating type as accumulator-type vectors (compiled per instruction
// set: include only from csrc/isa/*.cpp, inside namespace tdiff::CPU_CAPABILITY).
//
// A step covers Vectorized<T>::size() elements. float and double load as one Vectorized<acc_t>; half and
// bfloat16 as two Vectorized<float> (converted with the hardware instructions where the instruction set has them).
// `count` < the step size loads/stores a partial step (masked, zero-filled), so a span's tail needs no scalar loop.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

template <typename T>
struct Io {
  using acc_t = at::opmath_type<T>;
  using Raw = at::vec::Vectorized<T>;
  using V = at::vec::Vectorized<acc_t>;
  static constexpr int P = std::is_same_v<T, acc_t> ? 1 : 2;  // accumulator vectors per step
  static constexpr int64_t W = Raw::size();                   // elements per step

  static inline void load(const T* p, int64_t count, V* out) {
    if constexpr (P == 1) {
      out[0] = count == W ? V::loadu(p) : V::loadu(p, count);
    } else {
      const Raw r = count == W ? Raw::loadu(p) : Raw::loadu(p, count);
      auto [lo, hi] = at::vec::convert_to_float<T>(r);
      out[0] = lo;
      out[1] = hi;
    }
  }

  static inline void store(T* p, int64_t count, const V* in) {
    Raw r;
    if constexpr (P == 1)
      r = in[0];
    else
      r = at::vec::convert_from_float<T>(in[0], in[1]);
    if (count == W)
      r.store(p);
    else
      r.store(p, count);
  }

  // acc_t arrays (the float partial sums of half data) in the same P-vector layout
  static inline void load_acc(const acc_t* p, int64_t count, V* out) {
    for (int i = 0; i < P; ++i) {
      const int64_t c = count - i * V::size();
      out[i] = c >= V::size() ? V::loadu(p + i * V::size()) : c > 0 ? V::loadu(p + i * V::size(), c) : V(acc_t(0));
    }
  }
  static inline void store_acc(acc_t* p, int64_t count, const V* in) {
    for (int i = 0; i < P; ++i) {
      const int64_t c = count - i * V::size();
      if (c >= V::size())
        in[i].store(p + i * V::size());
      else if (c > 0)
        in[i].store(p + i * V::size(), c);
    }
  }
};

// fn(j, count) over [0, n) in vector steps of T, the last one partial. Two full steps per iteration: in cache, the
// loop's own bookkeeping is otherwise a visible share of each step.
template <typename T, typename F>
inline void for_each_step(int64_t n, const F& fn) {
  constexpr int64_t W = Io<T>::W;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    fn(j, W);
    fn(j + W, W);
  }
  if (j + W <= n) {
    fn(j, W);
    j += W;
  }
  if (j < n) fn(j, n - j);
}
