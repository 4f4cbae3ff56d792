// The AVX512 table's bfloat16 kernels with the hardware bfloat16 narrowing (vcvtne2ps2bf16, csrc/loops/vec_io.h),
// for CPUs with AVX512_BF16. setup.py compiles this file with the AVX512 flags plus -mavx512bf16 where the compiler
// knows that flag; without it the kernels are absent (null) and the AVX512 table keeps its software narrowing.
// csrc/cpu_kernels.cpp uses them only on a CPU that has the instructions.
#include "isa/table.h"

namespace tdiff {
const Kernels<c10::BFloat16>* kernels_AVX512_BF16() {
#if defined(__AVX512BF16__)
  static const Kernels<c10::BFloat16> table = CPU_CAPABILITY::kernels_of<c10::BFloat16>();
  return &table;
#else
  return nullptr;
#endif
}
}  // namespace tdiff
