// Fused noisy-sample construction on CPU: x_t = a x0 + s eps (and net_in = c x_t), coefficients per sample
// computed here from the schedule's kernel spec. Formulas mirror tdiff/schedules.py (the tests hold them equal).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "schedule_coefficients.h"
#include "row_spans.h"
#include "simd.h"

namespace tdiff {
namespace {

// One row of one sample: a plain multiply-add over contiguous memory, vectorised and cloned per ISA.
template <typename scalar_t, bool WRITE_INPUT>
TDIFF_SIMD_CLONES void noisy_sample_row(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ eps,
                                        scalar_t* __restrict__ xt, scalar_t* __restrict__ net_in,
                                        at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> s,
                                        at::opmath_type<scalar_t> c, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = a * static_cast<acc_t>(x0[j]) + s * static_cast<acc_t>(eps[j]);
    xt[j] = static_cast<scalar_t>(v);
    if constexpr (WRITE_INPUT) net_in[j] = static_cast<scalar_t>(c * v);
  }
}

// One pass over the data, in per-sample spans (each with its sample's coefficients).
template <typename scalar_t, bool WRITE_INPUT>
void noisy_sample_rows(const scalar_t* x0, const scalar_t* eps, scalar_t* xt, scalar_t* net_in, const double* coefs,
                       int64_t batch, int64_t n_per_sample) {
  using acc_t = at::opmath_type<scalar_t>;
  parallel_row_spans(batch, n_per_sample, at::internal::GRAIN_SIZE, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
    noisy_sample_row<scalar_t, WRITE_INPUT>(x0 + lo, eps + lo, xt + lo, WRITE_INPUT ? net_in + lo : nullptr,
                                            static_cast<acc_t>(coefs[3 * b]), static_cast<acc_t>(coefs[3 * b + 1]),
                                            static_cast<acc_t>(coefs[3 * b + 2]), len);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> noisy_sample_cpu(
    const at::Tensor& x0_in, const at::Tensor& eps_in, const at::Tensor& t, int64_t kind, at::ArrayRef<double> params,
    const std::optional<at::Tensor>& table, double precond_sigma_data, at::ArrayRef<double> fdm, int64_t fdm_on,
    bool write_input) {
  TORCH_CHECK(x0_in.device().is_cpu(), "noisy_sample_cpu: x0 must be a CPU tensor");
  TORCH_CHECK(x0_in.sizes() == eps_in.sizes(), "noisy_sample_cpu: eps must have the shape of x0");
  TORCH_CHECK(x0_in.scalar_type() == eps_in.scalar_type(), "noisy_sample_cpu: eps must have the dtype of x0");
  const at::Tensor x0 = x0_in.contiguous();
  const at::Tensor eps = eps_in.contiguous();
  const int64_t batch = x0.size(0);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "noisy_sample_cpu: t must have shape (B,)");

  // Per-sample coefficients in double: B values, negligible next to the data pass.
  const at::Tensor t64 = t.to(at::kDouble).contiguous();
  at::Tensor table64;
  const double* table_ptr = nullptr;
  int64_t table_n = 0;
  if (table.has_value() && table->defined()) {
    table64 = table->to(at::kDouble).contiguous();
    table_ptr = table64.data_ptr<double>();
    table_n = table64.numel();
  }
  ScheduleSpec spec = make_spec(kind, params, table_ptr, table_n, precond_sigma_data, fdm, fdm_on);
  at::Tensor coefs64 = at::empty({batch, 3}, t64.options());
  const double* tp = t64.data_ptr<double>();
  double* cp = coefs64.data_ptr<double>();
  for (int64_t b = 0; b < batch; ++b) sample_coefficients(spec, tp[b], cp + 3 * b);

  at::Tensor xt = at::empty_like(x0);
  at::Tensor net_in = write_input ? at::empty_like(x0) : at::empty({0}, x0.options());
  const int64_t total = x0.numel();
  const int64_t per_sample = batch ? total / batch : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0.scalar_type(), "noisy_sample_cpu", [&] {
    if (write_input)
      noisy_sample_rows<scalar_t, true>(x0.data_ptr<scalar_t>(), eps.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(),
                                        net_in.data_ptr<scalar_t>(), cp, batch, per_sample);
    else
      noisy_sample_rows<scalar_t, false>(x0.data_ptr<scalar_t>(), eps.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(),
                                         nullptr, cp, batch, per_sample);
  });
  const auto coef_type = at::toOpMathType(x0.scalar_type());
  return {xt, net_in, coefs64.to(coef_type)};
}

// grad_x0 = a g, grad_eps = s g with g = grad_xt + c grad_in (grad_in may be empty).
template <typename scalar_t, bool HAS_IN>
TDIFF_SIMD_CLONES void noisy_sample_backward_row(const scalar_t* __restrict__ gxt, const scalar_t* __restrict__ gin,
                                                 scalar_t* __restrict__ gx0, scalar_t* __restrict__ geps,
                                                 at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> s,
                                                 at::opmath_type<scalar_t> c, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    acc_t g = static_cast<acc_t>(gxt[j]);
    if constexpr (HAS_IN) g += c * static_cast<acc_t>(gin[j]);
    gx0[j] = static_cast<scalar_t>(a * g);
    geps[j] = static_cast<scalar_t>(s * g);
  }
}

template <typename scalar_t, bool HAS_IN>
void noisy_sample_backward_rows(const scalar_t* gxt, const scalar_t* gin, scalar_t* gx0, scalar_t* geps,
                                const double* coefs, int64_t batch, int64_t n_per_sample) {
  using acc_t = at::opmath_type<scalar_t>;
  parallel_row_spans(batch, n_per_sample, at::internal::GRAIN_SIZE, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
    noisy_sample_backward_row<scalar_t, HAS_IN>(gxt + lo, HAS_IN ? gin + lo : nullptr, gx0 + lo, geps + lo,
                                                static_cast<acc_t>(coefs[3 * b]), static_cast<acc_t>(coefs[3 * b + 1]),
                                                static_cast<acc_t>(coefs[3 * b + 2]), len);
  });
}

std::tuple<at::Tensor, at::Tensor> noisy_sample_backward_cpu(const at::Tensor& grad_xt_in, const at::Tensor& grad_in_in,
                                                             const at::Tensor& coefs) {
  const at::Tensor gxt = grad_xt_in.contiguous();
  const bool has_in = grad_in_in.numel() > 0;
  const at::Tensor gin = has_in ? grad_in_in.contiguous() : grad_in_in;
  TORCH_CHECK(!has_in || gin.sizes() == gxt.sizes(), "noisy_sample_backward_cpu: grad_in must match grad_xt");
  const at::Tensor c64 = coefs.to(at::kDouble).contiguous();
  at::Tensor gx0 = at::empty_like(gxt);
  at::Tensor geps = at::empty_like(gxt);
  const int64_t total = gxt.numel();
  const int64_t per_sample = gxt.size(0) ? total / gxt.size(0) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gxt.scalar_type(), "noisy_sample_backward_cpu", [&] {
    if (has_in)
      noisy_sample_backward_rows<scalar_t, true>(gxt.data_ptr<scalar_t>(), gin.data_ptr<scalar_t>(),
                                                 gx0.data_ptr<scalar_t>(), geps.data_ptr<scalar_t>(),
                                                 c64.data_ptr<double>(), gxt.size(0), per_sample);
    else
      noisy_sample_backward_rows<scalar_t, false>(gxt.data_ptr<scalar_t>(), nullptr, gx0.data_ptr<scalar_t>(),
                                                  geps.data_ptr<scalar_t>(), c64.data_ptr<double>(), gxt.size(0), per_sample);
  });
  return {gx0, geps};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tdiff, m) {
  m.def(
      "noisy_sample_cpu(Tensor x0, Tensor eps, Tensor t, int kind, float[] params, Tensor? table, "
      "float precond_sigma_data, float[] fdm, int fdm_on, bool write_input) -> (Tensor, Tensor, Tensor)");
  m.def("noisy_sample_backward_cpu(Tensor grad_xt, Tensor grad_in, Tensor coefs) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tdiff, CPU, m) {
  m.impl("noisy_sample_cpu", &noisy_sample_cpu);
  m.impl("noisy_sample_backward_cpu", &noisy_sample_backward_cpu);
}

}  // namespace tdiff
