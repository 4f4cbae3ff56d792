// Fused noisy-sample construction on CPU: x_t = a x0 + s eps (and net_in = c x_t), coefficients per sample
// computed here from the schedule's kernel spec. Formulas mirror tdiff/schedules.py (the tests hold them equal);
// the span loops are in csrc/loops/noisy_sample.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/SmallVector.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu_kernels.h"
#include "direct.h"
#include "outputs.h"
#include "row_spans.h"
#include "schedule_coefficients.h"

namespace tdiff {
namespace {

// One pass over the data, in per-sample spans (each with its sample's coefficients, coefs[b] = [a, s, c]).
template <typename T>
void noisy_sample_rows(const at::Tensor& x0, const at::Tensor& eps, at::Tensor& xt, at::Tensor* net_in,
                       const double* coefs) {
  using acc_t = at::opmath_type<T>;
  const auto& kern = kernels_for<T>();
  const int64_t batch = x0.size(0);
  const int64_t n = x0.numel() / batch;
  const T* xp = x0.data_ptr<T>();
  const T* ep = eps.data_ptr<T>();
  T* op = xt.data_ptr<T>();
  T* ip = net_in ? net_in->data_ptr<T>() : nullptr;
  parallel_row_spans(batch, n, at::internal::GRAIN_SIZE, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
    NoisySampleSpan<T> a{};
    a.x0 = xp + lo;
    a.eps = ep + lo;
    a.xt = op + lo;
    a.net_in = ip ? ip + lo : nullptr;
    a.a = static_cast<acc_t>(coefs[3 * b]);
    a.s = static_cast<acc_t>(coefs[3 * b + 1]);
    a.c = static_cast<acc_t>(coefs[3 * b + 2]);
    a.n = len;
    kern.noisy_sample(a);
  });
}

// The schedule arguments, checked and turned into the coefficient spec (the table as a contiguous float64 tensor,
// held by the result so the spec's pointer into it stays valid).
NoisySampleSchedule resolve_schedule(const char* op, int64_t kind, at::ArrayRef<double> params,
                                     const std::optional<at::Tensor>& table, double precond_sigma_data,
                                     at::ArrayRef<double> fdm, int64_t fdm_on) {
  NoisySampleSchedule out;
  const double* table_ptr = nullptr;
  int64_t table_n = 0;
  if (table.has_value() && table->defined()) {
    TORCH_CHECK_VALUE(table->device().is_cpu() && table->scalar_type() == at::kDouble && table->dim() == 1, op,
                      ": table must be a 1-D float64 CPU tensor of log-alpha, got ", table->scalar_type(), " ",
                      table->sizes(), " on ", table->device());
    out.table = table->contiguous();
    table_ptr = out.table.data_ptr<double>();
    table_n = out.table.numel();
    TORCH_CHECK_VALUE(kind == TABLE_VP, op, ": table is only for a discrete schedule (kind ", TABLE_VP, "), got kind ",
                      kind);
  }
  out.spec = make_spec(kind, params, table_ptr, table_n, precond_sigma_data, fdm, fdm_on);
  return out;
}

// The op on checked schedule arguments: x_t, net_in (undefined unless write_input) and the (B, 3) coefficients
// (undefined unless want_coefs). Outputs nobody asked for are not allocated: at in-cache sizes each allocation is
// a visible share of the call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> noisy_sample_run(const char* op, const ScheduleSpec& spec,
                                                                const at::Tensor& x0_in, const at::Tensor& eps_in,
                                                                const at::Tensor& t, bool write_input,
                                                                bool want_coefs) {
  check_data(op, "x0", x0_in);
  check_batch(op, "x0", x0_in);
  check_like(op, "eps", eps_in, "x0", x0_in);
  const int64_t batch = x0_in.size(0);
  check_rows(op, "t", t, batch, 0, /*shared=*/false, std::nullopt);
  // borrowed when already contiguous (the usual case): no reference-count traffic
  const c10::MaybeOwned<at::Tensor> x0 = x0_in.expect_contiguous();
  const c10::MaybeOwned<at::Tensor> eps = eps_in.expect_contiguous();

  // Per-sample coefficients in double: B values, negligible next to the data pass. No tensor ops and no heap
  // allocation for them (the times are read in place, in their own type): at in-cache sizes the fixed cost of each
  // one is a sizeable part of the pass.
  c10::SmallVector<double, 3 * 64> cp(static_cast<size_t>(3 * batch));
  switch (t.scalar_type()) {
    case at::kDouble: times_coefficients(spec, t.const_data_ptr<double>(), t.stride(0), batch, cp.data()); break;
    case at::kFloat: times_coefficients(spec, t.const_data_ptr<float>(), t.stride(0), batch, cp.data()); break;
    case at::kHalf: times_coefficients(spec, t.const_data_ptr<at::Half>(), t.stride(0), batch, cp.data()); break;
    case at::kBFloat16:
      times_coefficients(spec, t.const_data_ptr<at::BFloat16>(), t.stride(0), batch, cp.data());
      break;
    default: {  // any other floating type check_rows accepts (float8): through a float64 copy
      const at::Tensor t64 = t.to(at::kDouble).contiguous();
      times_coefficients(spec, t64.const_data_ptr<double>(), 1, batch, cp.data());
    }
  }

  at::Tensor xt = new_cpu_like(*x0);
  at::Tensor net_in = write_input ? new_cpu_like(*x0) : at::Tensor();
  at::Tensor coefs = want_coefs ? new_cpu({batch, 3}, at::toOpMathType(x0->scalar_type())) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0->scalar_type(), "noisy_sample", [&] {
    noisy_sample_rows<scalar_t>(*x0, *eps, xt, write_input ? &net_in : nullptr, cp.data());
    if (want_coefs) {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* out = coefs.data_ptr<acc_t>();
      for (int64_t i = 0; i < 3 * batch; ++i) out[i] = static_cast<acc_t>(cp[i]);
    }
  });
  return {xt, net_in, coefs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> noisy_sample_cpu(
    const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& t, int64_t kind, at::ArrayRef<double> params,
    const std::optional<at::Tensor>& table, double precond_sigma_data, at::ArrayRef<double> fdm, int64_t fdm_on,
    bool write_input) {
  const char* op = "tdiff::noisy_sample_cpu";
  const NoisySampleSchedule schedule = resolve_schedule(op, kind, params, table, precond_sigma_data, fdm, fdm_on);
  auto [xt, net_in, coefs] = noisy_sample_run(op, schedule.spec, x0, eps, t, write_input, /*want_coefs=*/true);
  if (!write_input) net_in = new_cpu({0}, x0.scalar_type());  // the schema's empty tensor for "no input"
  return {xt, net_in, coefs};
}

template <typename T>
void noisy_sample_backward_rows(const at::Tensor& gxt, const at::Tensor* gin, at::Tensor& gx0, at::Tensor& geps,
                                const double* coefs) {
  using acc_t = at::opmath_type<T>;
  const auto& kern = kernels_for<T>();
  const int64_t batch = gxt.size(0);
  const int64_t n = gxt.numel() / batch;
  const T* gp = gxt.data_ptr<T>();
  const T* ip = gin ? gin->data_ptr<T>() : nullptr;
  T* xp = gx0.data_ptr<T>();
  T* ep = geps.data_ptr<T>();
  parallel_row_spans(batch, n, at::internal::GRAIN_SIZE, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
    NoisySampleBackwardSpan<T> a{};
    a.gxt = gp + lo;
    a.gin = ip ? ip + lo : nullptr;
    a.gx0 = xp + lo;
    a.geps = ep + lo;
    a.a = static_cast<acc_t>(coefs[3 * b]);
    a.s = static_cast<acc_t>(coefs[3 * b + 1]);
    a.c = static_cast<acc_t>(coefs[3 * b + 2]);
    a.n = len;
    kern.noisy_sample_backward(a);
  });
}

// grad_x0 = a g, grad_eps = s g with g = grad_xt + c grad_in (grad_in may be empty: no network-input gradient).
std::tuple<at::Tensor, at::Tensor> noisy_sample_backward_cpu(const at::Tensor& grad_xt_in, const at::Tensor& grad_in_in,
                                                             const at::Tensor& coefs) {
  const char* op = "tdiff::noisy_sample_backward_cpu";
  check_data(op, "grad_xt", grad_xt_in);
  check_batch(op, "grad_xt", grad_xt_in);
  TORCH_CHECK_VALUE(grad_in_in.defined(), op, ": grad_in must be a tensor (empty for none)");
  const bool has_in = grad_in_in.numel() > 0;
  if (has_in) check_like(op, "grad_in", grad_in_in, "grad_xt", grad_xt_in);
  check_rows(op, "coefs", coefs, grad_xt_in.size(0), 3, /*shared=*/false, std::nullopt);
  const at::Tensor gxt = grad_xt_in.contiguous();
  const at::Tensor gin = has_in ? grad_in_in.contiguous() : grad_in_in;
  const at::Tensor c64 = coefs.scalar_type() == at::kDouble ? coefs.contiguous() : coefs.to(at::kDouble).contiguous();
  at::Tensor gx0 = new_cpu_like(gxt);
  at::Tensor geps = new_cpu_like(gxt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gxt.scalar_type(), "noisy_sample", [&] {
    noisy_sample_backward_rows<scalar_t>(gxt, has_in ? &gin : nullptr, gx0, geps, c64.data_ptr<double>());
  });
  return {gx0, geps};
}

}  // namespace

namespace direct {
std::tuple<at::Tensor, at::Tensor, at::Tensor> noisy_sample_cpu(
    const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& t, int64_t kind, at::ArrayRef<double> params,
    const std::optional<at::Tensor>& table, double precond_sigma_data, at::ArrayRef<double> fdm, int64_t fdm_on,
    bool write_input) {
  return ::tdiff::noisy_sample_cpu(x0, eps, t, kind, params, table, precond_sigma_data, fdm, fdm_on, write_input);
}

NoisySampler::NoisySampler(int64_t kind, at::ArrayRef<double> params, const std::optional<at::Tensor>& table,
                           double precond_sigma_data, at::ArrayRef<double> fdm, int64_t fdm_on)
    : schedule_(resolve_schedule("tdiff._C.NoisySampler", kind, params, table, precond_sigma_data, fdm, fdm_on)) {}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> NoisySampler::operator()(
    const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& t, bool write_input, bool want_coefs) const {
  auto [xt, net_in, coefs] =
      noisy_sample_run("tdiff::noisy_sample_cpu", schedule_.spec, x0, eps, t, write_input, want_coefs);
  return {xt, net_in.defined() ? std::optional<at::Tensor>(net_in) : std::nullopt,
          coefs.defined() ? std::optional<at::Tensor>(coefs) : std::nullopt};
}
}  // namespace direct

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
