// The function table of one instruction set: include once from csrc/isa/<isa>.cpp, which setup.py compiles with
// that instruction set's -m flags and -DCPU_CAPABILITY=<ISA> (and ATen's CPU_CAPABILITY_<ISA>). Everything here
// lives in tdiff::CPU_CAPABILITY, so the tables of different instruction sets never share a symbol.
#pragma once

#ifndef CPU_CAPABILITY
#error "compile csrc/isa/*.cpp through setup.py (it defines CPU_CAPABILITY)"
#endif

#include "cpu_kernels.h"

// the loop headers' own dependencies, included here at global scope (their include guards keep them there)
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace tdiff {
namespace CPU_CAPABILITY {

#include "loops/cached_block.h"
#include "loops/multistep_update.h"
#include "loops/noisy_sample.h"
#include "loops/weighted_mse.h"

template <typename T>
Kernels<T> kernels_of() {
  return Kernels<T>{&multistep<T>, &multistep_backward<T>, &noisy_sample<T>, &noisy_sample_backward<T>,
                    &sum_sq_diff<T>, &scaled_diff<T>, &cached_block_row<T>, &cached_block_backward_row<T>};
}

inline CpuKernels make_table(const char* isa) {
  return CpuKernels{isa, kernels_of<float>(), kernels_of<double>(), kernels_of<c10::BFloat16>(),
                    kernels_of<c10::Half>()};
}

}  // namespace CPU_CAPABILITY
}  // namespace tdiff
