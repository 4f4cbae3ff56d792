// The vectorised inner loops of every CPU kernel, behind one function table per instruction set.
//
// The op files (csrc/<op>.cpp) validate, allocate and split the work into per-sample spans; the loops over a span
// live in csrc/loops/<op>.h and are compiled once per instruction set (csrc/isa/{default,avx2,avx512}.cpp, each
// with its own -m flags and ATen's CPU_CAPABILITY, so at::vec::Vectorized<T> is the real AVX2 / AVX-512 one and
// Vectorized<Half> / Vectorized<BFloat16> convert with the hardware instructions). At the first call the table of
// the best instruction set that ATen itself uses (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY) is
// picked, so the extension loads on any x86-64 machine. Half and bfloat16 data accumulate in float. On a CPU with
// AVX512_BF16 the AVX512 table's bfloat16 kernels are the ones compiled with it (the hardware narrowing, the same
// bits).
//
// This header is included by both sides: it holds only plain structs of raw pointers and function pointers.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

namespace tdiff {

constexpr int kMaxHistory = 4;

// out = c[0] x + c[1] m' + sum_{k>=1} c[k+1] h[k] over one span of one sample, where
//   m' = h[0]                            (plain)
//   m' = u + w (h[0] - u)                (cfg: classifier-free guidance, u = uncond)
//   m' = p src + q m'                    (convert: the affine prediction -> x0 conversion, after guidance)
// With cfg or convert, m' is written to h0 (the history entry to keep).
template <typename T>
struct MultistepSpan {
  using acc_t = at::opmath_type<T>;
  const T* x;
  const T* h[kMaxHistory];
  const T* uncond;  // cfg only
  const T* src;     // convert only
  T* out;
  T* h0;            // cfg or convert
  const acc_t* c;   // 1 + k coefficients
  acc_t w, p, q;
  int k;
  bool cfg, convert;
  int64_t n;
};

// gx = c[0] g, gh[k] = c[k+1] g, dots[0] = <g, x>, dots[k+1] = <g, h[k]> (the span's share).
template <typename T>
struct MultistepBackwardSpan {
  using acc_t = at::opmath_type<T>;
  const T* g;
  const T* x;
  const T* h[kMaxHistory];
  T* gx;
  T* gh[kMaxHistory];
  const acc_t* c;
  acc_t* dots;  // 1 + k
  int k;
  int64_t n;
};

// xt = a x0 + s eps; net_in = c xt (when net_in is not null).
template <typename T>
struct NoisySampleSpan {
  using acc_t = at::opmath_type<T>;
  const T* x0;
  const T* eps;
  T* xt;
  T* net_in;
  acc_t a, s, c;
  int64_t n;
};

// g = gxt + c gin (gin may be null); gx0 = a g, geps = s g.
template <typename T>
struct NoisySampleBackwardSpan {
  using acc_t = at::opmath_type<T>;
  const T* gxt;
  const T* gin;
  T* gx0;
  T* geps;
  acc_t a, s, c;
  int64_t n;
};

// One (sample, token) row of C channels: branch_out = branch_in, out = x + gate * branch_in.
template <typename T>
struct CachedBlockRow {
  const T* x;
  const T* gate;
  const T* branch_in;
  T* out;
  T* branch_out;
  int64_t c;
};

// One row of the backward: gx = gout, gate_acc += gout * branch, to = gout * gate + gbr, zero (if not null) = 0.
template <typename T>
struct CachedBlockBackwardRow {
  using acc_t = at::opmath_type<T>;
  const T* gout;
  const T* gbr;
  const T* gate;
  const T* branch;
  T* gx;
  T* to;
  T* zero;
  acc_t* gate_acc;
  int64_t c;
};

template <typename T>
struct Kernels {
  using acc_t = at::opmath_type<T>;
  void (*multistep)(const MultistepSpan<T>&);
  void (*multistep_backward)(const MultistepBackwardSpan<T>&);
  void (*noisy_sample)(const NoisySampleSpan<T>&);
  void (*noisy_sample_backward)(const NoisySampleBackwardSpan<T>&);
  acc_t (*sum_sq_diff)(const T* p, const T* q, int64_t n);             // sum_j (p_j - q_j)^2
  void (*scaled_diff)(const T* p, const T* q, acc_t s, T* out, int64_t n);  // out = s (p - q)
  void (*cached_block)(const CachedBlockRow<T>&);
  void (*cached_block_backward)(const CachedBlockBackwardRow<T>&);
};

struct CpuKernels {
  const char* isa;
  Kernels<float> f32;
  Kernels<double> f64;
  Kernels<c10::BFloat16> bf16;
  Kernels<c10::Half> f16;
};

// The tables each instruction-set translation unit builds (csrc/isa/*.cpp).
const CpuKernels& kernels_DEFAULT();
#ifdef TDIFF_X86_ISA
const CpuKernels& kernels_AVX2();
const CpuKernels& kernels_AVX512();
// the AVX512 table's bfloat16 kernels built with -mavx512bf16, or null where the compiler lacked it
const Kernels<c10::BFloat16>* kernels_AVX512_BF16();
#endif

// The table in use (csrc/cpu_kernels.cpp).
const CpuKernels& cpu_kernels();

template <typename T>
const Kernels<T>& kernels_for();
template <>
inline const Kernels<float>& kernels_for<float>() { return cpu_kernels().f32; }
template <>
inline const Kernels<double>& kernels_for<double>() { return cpu_kernels().f64; }
template <>
inline const Kernels<c10::BFloat16>& kernels_for<c10::BFloat16>() { return cpu_kernels().bf16; }
template <>
inline const Kernels<c10::Half>& kernels_for<c10::Half>() { return cpu_kernels().f16; }

}  // namespace tdiff
