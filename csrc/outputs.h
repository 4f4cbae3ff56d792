// Output allocation for the CPU ops. at::empty / at::empty_like go through the dispatcher (and empty_like through
// its memory-format logic): about a microsecond each, as much as an in-cache data pass's share of a small op. The
// ops' outputs are always fresh contiguous CPU tensors (their fakes promise exactly that), so they are allocated
// straight from the CPU allocator here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

namespace tdiff {

// A contiguous, uninitialised CPU tensor.
inline at::Tensor new_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_cpu(sizes, dtype));
}

// A contiguous, uninitialised CPU tensor with the shape and dtype of `like`.
inline at::Tensor new_cpu_like(const at::Tensor& like) { return new_cpu(like.sizes(), like.scalar_type()); }

}  // namespace tdiff
