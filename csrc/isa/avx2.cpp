// The AVX2 table of csrc/cpu_kernels.h (setup.py compiles this file with the AVX2 flags).
#include "isa/table.h"

namespace tdiff {
const CpuKernels& kernels_AVX2() {
  static const CpuKernels table = CPU_CAPABILITY::make_table("AVX2");
  return table;
}
}  // namespace tdiff
