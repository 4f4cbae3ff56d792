// Output allocation for the CPU ops. at::empty_like costs two dispatcher calls (empty_like, then empty_strided)
// plus its memory-format logic: about a microsecond, a sizeable share of an in-cache op. The ops' outputs are
// always fresh contiguous tensors (their fakes promise exactly that), so one at::empty does. It still goes through
// the dispatcher, once: the profiler sees every allocation (tests/test_solvers.py counts them).
#pragma once

#include <ATen/ATen.h>

namespace tdiff {

// A contiguous, uninitialised CPU tensor.
inline at::Tensor new_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::empty(sizes, at::TensorOptions().dtype(dtype));
}

// A contiguous, uninitialised CPU tensor with the shape and dtype of `like`.
inline at::Tensor new_cpu_like(const at::Tensor& like) { return new_cpu(like.sizes(), like.scalar_type()); }

}  // namespace tdiff
