// The DEFAULT table of csrc/cpu_kernels.h (setup.py compiles this file with the DEFAULT flags).
#include "isa/table.h"

namespace tdiff {
const CpuKernels& kernels_DEFAULT() {
  static const CpuKernels table = CPU_CAPABILITY::make_table("DEFAULT");
  return table;
}
}  // namespace tdiff
