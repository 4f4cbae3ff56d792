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

// Full steps of half / bfloat16 data, converted straight from and to memory: each half-width load widens in one
// instruction (vcvtph2ps / vpmovzxwd with a memory operand) and each float half of a step narrows on its way to
// memory. ATen's Vectorized<T> path loads the whole step into one register and splits it (an extract and a
// register-form conversion per half): shuffle-port work that bounds an in-cache pass. The results are the same
// bits: the same conversions (round to nearest even; ATen's own bfloat16 rounding for stores, or with AVX512_BF16
// the hardware's where it gives the same bits). load_full / store_full return false where this instruction set has
// no such path (the caller takes ATen's).
namespace half_io {
#if defined(CPU_CAPABILITY_AVX512)
inline bool load_full(const c10::Half* p, at::vec::Vectorized<float>* out) {
  out[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  out[1] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
  return true;
}
inline bool load_full(const c10::BFloat16* p, at::vec::Vectorized<float>* out) {
  for (int i = 0; i < 2; ++i)
    out[i] = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * i))), 16));
  return true;
}
inline bool store_full(c10::Half* p, const at::vec::Vectorized<float>* in) {
  for (int i = 0; i < 2; ++i)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16 * i),
                        _mm512_cvtps_ph(in[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return true;
}
#if defined(__AVX512BF16__)
// Whether vcvtne2ps2bf16 narrows both vectors exactly as ATen does: it treats subnormal inputs as zero and keeps
// NaN payloads (ATen rounds subnormals like any float and writes NaN as 0xffff), so a step with any subnormal or NaN
// lane takes ATen's software rounding instead. fpclass 0xA1: quiet NaN (0x01), subnormal (0x20), signalling NaN
// (0x80). Everything else (zeros, normals, overflow to infinity, infinities) rounds to nearest even alike: the
// exhaustive check over all 2^32 floats is in bench/half_ceiling.py.
inline bool bf16_narrowing_exact(__m512 a, __m512 b) {
  return _kortestz_mask16_u8(_mm512_fpclass_ps_mask(a, 0xA1), _mm512_fpclass_ps_mask(b, 0xA1));
}
// the hardware narrowing, elements 0..15 of the result from lo, 16..31 from hi
inline __m512i bf16_narrow(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }
inline bool store_full(c10::BFloat16* p, const at::vec::Vectorized<float>* in) {
  if (!bf16_narrowing_exact(in[0], in[1])) return false;
  _mm512_storeu_si512(p, bf16_narrow(in[0], in[1]));
  return true;
}
#endif
#elif defined(CPU_CAPABILITY_AVX2)
inline bool load_full(const c10::Half* p, at::vec::Vectorized<float>* out) {
  out[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  out[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  return true;
}
inline bool load_full(const c10::BFloat16* p, at::vec::Vectorized<float>* out) {
  for (int i = 0; i < 2; ++i)
    out[i] = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * i))), 16));
  return true;
}
inline bool store_full(c10::Half* p, const at::vec::Vectorized<float>* in) {
  for (int i = 0; i < 2; ++i)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8 * i),
                     _mm256_cvtps_ph(in[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return true;
}
#endif
// the fallbacks: no direct path for this type on this instruction set
template <typename T, typename V>
inline bool load_full(const T*, V*) {
  return false;
}
template <typename T, typename V>
inline bool store_full(T*, const V*) {
  return false;
}
}  // namespace half_io

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
      if (count == W && half_io::load_full(p, out)) return;
      const Raw r = count == W ? Raw::loadu(p) : Raw::loadu(p, count);
      auto [lo, hi] = at::vec::convert_to_float<T>(r);
      out[0] = lo;
      out[1] = hi;
    }
  }

  static inline void store(T* p, int64_t count, const V* in) {
    if constexpr (P == 2)
      if (count == W && half_io::store_full(p, in)) return;
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

constexpr int64_t kWritePrefetchBytes = 1024;

// Ask for the cache line `ahead` bytes past p in a writable state: PREFETCHW on AVX-512 CPUs (all have it; GCC emits
// it for __builtin_prefetch only with -mprfchw, which ATen's flags do not set), a prefetch elsewhere. A prefetch
// never faults, so a line past the end of the buffer is harmless.
template <typename T>
inline void prefetch_for_write(T* p, int64_t ahead) {
  const char* line = reinterpret_cast<const char*>(p) + ahead;
#if defined(CPU_CAPABILITY_AVX512)
  asm volatile("prefetchw %0" : : "m"(*line));
#else
  __builtin_prefetch(line, 1, 3);
#endif
}

// for_each_step's order with four full steps per iteration, each iteration first asking for the NOUT outputs'
// lines kWritePrefetchBytes ahead in a writable state: their read-for-ownership starts early instead of stalling
// the stores (in cache the loop's own bookkeeping is a visible share too: multistep_update, K = 4 at 16x4x32x32,
// 3-15% faster than two steps per iteration and 5-10% faster with the prefetch, in L2 and out of cache;
// noisy_sample's half forms 4-14%). `fn` must be always_inline (a lambda with __attribute__((always_inline))): left
// out of line, its captures escape and the compiler reloads the coefficient vectors after every store through T*.
template <typename T, int NOUT, typename F>
__attribute__((always_inline)) inline void for_each_step_writing(int64_t n, T* const (&out)[NOUT], const F& fn) {
  constexpr int64_t W = Io<T>::W;
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    for (int s = 0; s < 4; ++s)
      for (int o = 0; o < NOUT; ++o) prefetch_for_write(out[o] + j + s * W, kWritePrefetchBytes);
    fn(j, W);
    fn(j + W, W);
    fn(j + 2 * W, W);
    fn(j + 3 * W, W);
  }
  for (; j + W <= n; j += W) fn(j, W);
  if (j < n) fn(j, n - j);
}

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

// Io<T> for loops that treat every element alike within a step (elementwise, one coefficient set per span): the
// lanes of a full step may hold its elements in any order, as long as the step's stores put each back where its
// load found it. For bfloat16 on AVX512 that order is even elements in one vector and odd ones in the other: a
// bfloat16 is the high half of a float, so widening is a shift or a mask of the loaded 32-bit lanes and narrowing
// a blend of 16-bit lanes, with no cross-lane shuffle (ATen's order costs a widening move per load and a pack and
// a permute per store, all on the shuffle port that bounds the in-cache pass). Rounding is ATen's, bit for bit
// (round to nearest even, NaN to 0xffff; with AVX512_BF16, the hardware narrowing where it rounds alike). Partial
// steps, and every other type, take Io<T> as it is.
template <typename T>
struct IoAnyOrder : Io<T> {};

#if defined(CPU_CAPABILITY_AVX512)
template <>
struct IoAnyOrder<c10::BFloat16> : Io<c10::BFloat16> {
  using Base = Io<c10::BFloat16>;
  using V = Base::V;
  static constexpr int64_t W = Base::W;

  static inline void load(const c10::BFloat16* p, int64_t count, V* out) {
    if (count != W) return Base::load(p, count, out);
    const __m512i raw = _mm512_loadu_si512(p);
    out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));                             // even elements
    out[1] = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int(0xffff0000u))));  // odd elements
  }

  static inline void store(c10::BFloat16* p, int64_t count, const V* in) {
    if (count != W) return Base::store(p, count, in);
#if defined(__AVX512BF16__)
    // one hardware narrowing (even elements in words 0..15, odd ones in 16..31) and one word permute back to memory
    // order, where the step allows it (half_io::bf16_narrowing_exact)
    if (half_io::bf16_narrowing_exact(in[0], in[1])) {
      // word 2i <- word i (element 2i), word 2i+1 <- word 16 + i (element 2i + 1): dword i = i | (16 + i) << 16
      const __m512i interleave = _mm512_set_epi32(0x001f000f, 0x001e000e, 0x001d000d, 0x001c000c, 0x001b000b,
                                                   0x001a000a, 0x00190009, 0x00180008, 0x00170007, 0x00160006,
                                                   0x00150005, 0x00140004, 0x00130003, 0x00120002, 0x00110001,
                                                   0x00100000);
      _mm512_storeu_si512(p, _mm512_permutexvar_epi16(interleave, half_io::bf16_narrow(in[0], in[1])));
      return;
    }
#endif
    const __m512i even = rounded(in[0]);
    const __m512i odd = rounded(in[1]);
    // 16-bit lanes: even elements' bfloat16 (shifted down) in the low halves, odd ones' in place in the high halves
    _mm512_storeu_si512(p, _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(even, 16), odd));
  }

 private:
  // the float's bits with its round-to-nearest-even bfloat16 in the high half (0xffff there for NaN), as ATen's
  // cvtfp32_bf16: x + 0x7fff + ((x >> 16) & 1)
  static inline __m512i rounded(const V& v) {
    const __m512 f = v;
    const __m512i x = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb);
    return _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), _mm512_cmp_ps_mask(f, f, _CMP_ORD_Q), r);
  }
};
#endif
