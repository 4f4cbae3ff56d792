// The registered CPU ops' entry points, callable from C++ without the dispatcher: csrc/module.cpp binds them as
// tdiff._C.<name> for the public functions' eager no-grad fast path (tdiff/ops/dispatch.py: eager_kernel). The
// dispatcher call from Python costs several microseconds per op, as much as the op itself at small sizes.
// Each function validates its inputs exactly as the registered op does (it is the same function).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "schedule_coefficients.h"

namespace tdiff {

// noisy_sample's schedule arguments, checked and resolved: the coefficient spec, and the contiguous float64 table
// its pointer refers to (held here, so it lives as long as the spec).
struct NoisySampleSchedule {
  ScheduleSpec spec{};
  at::Tensor table;
};

namespace direct {

at::Tensor multistep_update_cpu(const at::Tensor& x, at::TensorList history, const at::Tensor& coeffs);
std::tuple<at::Tensor, at::Tensor> multistep_update_convert_cpu(
    const at::Tensor& x, at::TensorList history, const at::Tensor& coeffs, const std::optional<at::Tensor>& uncond,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& src,
    const std::optional<at::Tensor>& convert);
void multistep_update_out_cpu(const at::Tensor& x, at::TensorList history, const at::Tensor& coeffs,
                              const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& src, const std::optional<at::Tensor>& convert,
                              const at::Tensor& out, const std::optional<at::Tensor>& h0);
std::tuple<at::Tensor, at::Tensor, at::Tensor> noisy_sample_cpu(
    const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& t, int64_t kind, at::ArrayRef<double> params,
    const std::optional<at::Tensor>& table, double precond_sigma_data, at::ArrayRef<double> fdm, int64_t fdm_on,
    bool write_input);
// noisy_sample_cpu with the schedule arguments resolved once (tdiff._C.NoisySampler, made once per schedule by
// tdiff/ops/noisy_sample.py): a call parses 5 arguments instead of 10 and allocates only the outputs asked for
// (net_in with write_input, the (B, 3) coefficients with want_coefs; None otherwise). Same checks, same results.
class NoisySampler {
 public:
  NoisySampler(int64_t kind, at::ArrayRef<double> params, const std::optional<at::Tensor>& table,
               double precond_sigma_data, at::ArrayRef<double> fdm, int64_t fdm_on);
  std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> operator()(
      const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& t, bool write_input, bool want_coefs) const;

 private:
  NoisySampleSchedule schedule_;
};
std::tuple<at::Tensor, at::Tensor> weighted_mse_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                    const at::Tensor& weight);
std::tuple<at::Tensor, at::Tensor> cached_block_cpu(const at::Tensor& x, const at::Tensor& gate,
                                                    const at::Tensor& fresh, const at::Tensor& cache,
                                                    const at::Tensor& source);

}  // namespace direct
}  // namespace tdiff
