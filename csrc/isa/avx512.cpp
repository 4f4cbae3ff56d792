// The AVX512 table of csrc/cpu_kernels.h (setup.py compiles this file with the AVX512 flags).
#include "isa/table.h"

namespace tdiff {
const CpuKernels& kernels_AVX512() {
  static const CpuKernels table = CPU_CAPABILITY::make_table("AVX512");
  return table;
}
}  // namespace tdiff
