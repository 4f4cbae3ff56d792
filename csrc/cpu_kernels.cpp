// Picks the instruction-set table of csrc/cpu_kernels.h: the one ATen itself runs with (at::get_cpu_capability(),
// which honours ATEN_CPU_CAPABILITY), unless tdiff::cpu_capability(name) chose a lower one (tests use it to run
// every table on one machine).
#include "cpu_kernels.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <string>

namespace tdiff {
namespace {

int rank(const std::string& isa) {
#ifdef TDIFF_X86_ISA
  if (isa == "AVX512") return 2;
  if (isa == "AVX2") return 1;
#endif
  return 0;  // DEFAULT, and anything ATen reports that this build has no table for (VSX, SVE, ...)
}

#ifdef TDIFF_X86_ISA
// The AVX512 table, with the bfloat16 kernels that narrow in hardware where both the build and this CPU have
// AVX512_BF16 (ATen's AVX512 capability already means the OS saves the AVX-512 state). Only the kernels whose
// outputs are all bfloat16 are taken: those with float outputs (multistep_backward's dot products, sum_sq_diff,
// cached_block_backward's gate sums) stay the AVX512 table's own, because compiled apart the same arithmetic may
// take its operands in another order, and with two NaN operands the float result's NaN payload follows that order
// (a bfloat16 store writes every NaN alike).
const CpuKernels& kernels_AVX512_best() {
  static const CpuKernels table = [] {
    CpuKernels t = kernels_AVX512();
    const Kernels<c10::BFloat16>* native = kernels_AVX512_BF16();
    if (native != nullptr && __builtin_cpu_supports("avx512bf16")) {
      t.bf16.multistep = native->multistep;
      t.bf16.noisy_sample = native->noisy_sample;
      t.bf16.noisy_sample_backward = native->noisy_sample_backward;
      t.bf16.scaled_diff = native->scaled_diff;
      t.bf16.cached_block = native->cached_block;
    }
    return t;
  }();
  return table;
}
#endif

const CpuKernels* table_of_rank(int r) {
#ifdef TDIFF_X86_ISA
  if (r == 2) return &kernels_AVX512_best();
  if (r == 1) return &kernels_AVX2();
#endif
  (void)r;
  return &kernels_DEFAULT();
}

int detected_rank() {
  static const int r = rank(at::get_cpu_capability());
  return r;
}

std::atomic<const CpuKernels*> current{nullptr};

std::string cpu_capability(c10::string_view name) {
  std::string previous = cpu_kernels().isa;
  if (!name.empty()) {
    std::string want(name.data(), name.size());
    std::transform(want.begin(), want.end(), want.begin(), [](unsigned char ch) { return std::toupper(ch); });
    TORCH_CHECK_VALUE(want == "DEFAULT" || want == "AVX2" || want == "AVX512",
                      "tdiff::cpu_capability: name must be 'default', 'avx2' or 'avx512', got '", want, "'");
    const int r = rank(want);
    TORCH_CHECK_VALUE(r == (want == "DEFAULT" ? 0 : want == "AVX2" ? 1 : 2) && r <= detected_rank(),
                      "tdiff::cpu_capability: ", want, " is not available here (this build and machine support up "
                      "to ", table_of_rank(detected_rank())->isa, ")");
    current.store(table_of_rank(r), std::memory_order_relaxed);
  }
  return previous;
}

}  // namespace

const CpuKernels& cpu_kernels() {
  const CpuKernels* t = current.load(std::memory_order_relaxed);
  if (t == nullptr) {
    t = table_of_rank(detected_rank());
    current.store(t, std::memory_order_relaxed);
  }
  return *t;
}

TORCH_LIBRARY_FRAGMENT(tdiff, m) {
  // cpu_capability() -> the instruction set in use; cpu_capability("avx2") switches to it, returns the previous one
  m.def("cpu_capability(str name=\"\") -> str", &cpu_capability);
}

}  // namespace tdiff
