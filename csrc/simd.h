// Runtime CPU dispatch for the hot loops of the CPU kernels. The extension is built for baseline x86-64 (so it
// loads on any machine); GCC's target_clones compiles a marked function again for AVX2 and AVX-512 and picks the
// best one when the library loads. Mark only small, vectorisable inner loops with TDIFF_SIMD_CLONES.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TDIFF_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TDIFF_SIMD_CLONES
#endif
