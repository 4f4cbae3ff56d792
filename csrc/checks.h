// Input validation shared by the registered CPU ops. Every tdiff::*_cpu op is callable directly through
// torch.ops.tdiff, so each one checks shapes, dtypes, devices and indices itself and raises ValueError
// (TORCH_CHECK_VALUE) naming the argument and what was expected.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace tdiff {

inline bool is_float_type(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf;
}

// Names are string views: a literal passes without building a std::string on every call. The messages are
// assembled inside TORCH_CHECK_VALUE, which evaluates them only when the check fails.

// A data tensor: defined, on the CPU, of a floating type this library computes in.
inline void check_data(const char* op, std::string_view name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(is_float_type(t.scalar_type()), op, ": ", name,
                    " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

// A batch of samples: at least one dimension, at least one sample.
inline void check_batch(const char* op, std::string_view name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) > 0, op, ": ", name,
                    " must have a non-empty batch dimension, got shape ", t.sizes());
}

// Same shape, dtype and device as `ref`.
inline void check_like(const char* op, std::string_view name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ", ref.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
                    ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

// Per-sample values: (batch,) (or, with width > 0, rows (batch, width)), on the CPU, floating. With `shared`,
// one row / one value for the whole batch is accepted too ((width,) or a 0-dim scalar). With dtype given, the
// tensor must have it exactly (the coefficient rows of the update).
inline void check_rows(const char* op, const char* name, const at::Tensor& t, int64_t batch, int64_t width,
                       bool shared, c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  if (dtype.has_value()) {
    TORCH_CHECK_VALUE(t.scalar_type() == *dtype, op, ": ", name, " must be ", *dtype, " (float64 for float64 data, "
                      "float32 otherwise), got ", t.scalar_type());
  } else {
    TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating, got ",
                      t.scalar_type());
  }
  const bool per_sample = width > 0 ? (t.dim() == 2 && t.size(0) == batch && t.size(1) == width)
                                    : (t.dim() == 1 && t.size(0) == batch);
  const bool one_for_all = shared && (width > 0 ? (t.dim() == 1 && t.size(0) == width) : t.dim() == 0);
  if (width > 0) {
    TORCH_CHECK_VALUE(per_sample || one_for_all, op, ": ", name, " must have shape (", batch, ", ", width, ")",
                      shared ? " or (" + std::to_string(width) + ",)" : std::string(), ", got ", t.sizes());
  } else {
    TORCH_CHECK_VALUE(per_sample || one_for_all, op, ": ", name, " must have shape (", batch, ",)",
                      shared ? " or be a scalar" : "", ", got ", t.sizes());
  }
}

// The cached-block source map: int64 (batch,), each entry -1 (reuse the cache) or a row of `fresh`, and the
// computing samples map one-to-one onto the `rows` fresh rows (so every fresh row is read, and its gradient
// written, by exactly one sample).
inline void check_source(const char* op, const at::Tensor& source, int64_t batch, int64_t rows) {
  TORCH_CHECK_VALUE(source.defined(), op, ": source must be a tensor");
  TORCH_CHECK_VALUE(source.device().is_cpu() && source.scalar_type() == at::kLong && source.dim() == 1 &&
                        source.size(0) == batch,
                    op, ": source must be an int64 CPU tensor of shape (", batch, ",), got ", source.scalar_type(),
                    " ", source.sizes(), " on ", source.device());
  const at::Tensor s = source.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  std::vector<char> seen(static_cast<size_t>(rows), 0);
  int64_t computing = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(sp[b] >= -1 && sp[b] < rows, op, ": source[", b, "] = ", sp[b], " is out of range: expected -1 "
                      "(reuse the cache) or a row of fresh in [0, ", rows, ")");
    if (sp[b] >= 0) {
      TORCH_CHECK_VALUE(!seen[sp[b]], op, ": source maps two samples onto fresh row ", sp[b],
                        "; each fresh row belongs to exactly one sample");
      seen[sp[b]] = 1;
      ++computing;
    }
  }
  TORCH_CHECK_VALUE(computing == rows, op, ": fresh has ", rows, " rows but source selects ", computing,
                    "; each fresh row belongs to exactly one sample");
}

}  // namespace tdiff
