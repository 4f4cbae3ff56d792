// Fused weighted per-sample MSE on CPU: loss_b = w_b * mean_j (pred_bj - target_bj)^2, and its backward
// grad_pred = (2 w_b g_b / N) (pred - target). Memory-bound: one read of pred and target, (B,) written; the span
// loops are in csrc/loops/weighted_mse.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_kernels.h"
#include "direct.h"
#include "row_spans.h"

#include <optional>
#include <tuple>
#include <vector>

namespace tdiff {
namespace {

void check_pair(const char* op, const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight) {
  check_data(op, "pred", pred);
  check_batch(op, "pred", pred);
  TORCH_CHECK_VALUE(pred.numel() > 0, op, ": pred must hold data, got shape ", pred.sizes());
  check_like(op, "target", target, "pred", pred);
  check_rows(op, "weight", weight, pred.size(0), 0, /*shared=*/false, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor> weighted_mse_cpu(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                    const at::Tensor& weight) {
  const char* op = "tdiff::weighted_mse_cpu";
  check_pair(op, pred_in, target_in, weight);
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t batch = pred.size(0);
  const int64_t n = pred.numel() / batch;
  const int64_t spans = spans_per_sample(n, kSpanChunk);  // each row in spans; their sums added in a fixed order
  const auto acc_type = at::toOpMathType(pred.scalar_type());
  at::Tensor mse = at::empty({batch}, pred.options().dtype(acc_type));
  at::Tensor loss = at::empty({batch}, pred.options().dtype(acc_type));
  const at::Tensor w = weight.to(acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "weighted_mse", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto& kern = kernels_for<scalar_t>();
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* q = target.data_ptr<scalar_t>();
    std::vector<acc_t> part(static_cast<size_t>(batch * spans));
    parallel_row_spans(batch, n, kSpanChunk, [&](int64_t task, int64_t, int64_t lo, int64_t len) {
      part[task] = kern.sum_sq_diff(p + lo, q + lo, len);
    });
    acc_t* m = mse.data_ptr<acc_t>();
    acc_t* l = loss.data_ptr<acc_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    sum_span_partials(part.data(), batch, spans, 1, m);
    for (int64_t b = 0; b < batch; ++b) {
      m[b] /= static_cast<acc_t>(n);
      l[b] = wp[b] * m[b];
    }
  });
  return {loss, mse};
}

at::Tensor weighted_mse_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& pred_in,
                                     const at::Tensor& target_in, const at::Tensor& weight) {
  const char* op = "tdiff::weighted_mse_backward_cpu";
  check_pair(op, pred_in, target_in, weight);
  check_rows(op, "grad_loss", grad_loss, pred_in.size(0), 0, /*shared=*/false, std::nullopt);
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t batch = pred.size(0);
  const int64_t n = pred.numel() / batch;
  const auto acc_type = at::toOpMathType(pred.scalar_type());
  // per-sample scale 2 w g / N, B values
  const at::Tensor scale = (grad_loss.to(acc_type) * weight.to(acc_type) * (2.0 / static_cast<double>(n))).contiguous();
  at::Tensor grad = at::empty_like(pred);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "weighted_mse", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto& kern = kernels_for<scalar_t>();
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* q = target.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const acc_t* sc = scale.data_ptr<acc_t>();
    parallel_row_spans(batch, n, at::internal::GRAIN_SIZE, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
      kern.scaled_diff(p + lo, q + lo, sc[b], g + lo, len);
    });
  });
  return grad;
}

}  // namespace

namespace direct {
std::tuple<at::Tensor, at::Tensor> weighted_mse_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                    const at::Tensor& weight) {
  return ::tdiff::weighted_mse_cpu(pred, target, weight);
}
}  // namespace direct

TORCH_LIBRARY_FRAGMENT(tdiff, m) {
  m.def("weighted_mse_cpu(Tensor pred, Tensor target, Tensor weight) -> (Tensor, Tensor)");
  m.def("weighted_mse_backward_cpu(Tensor grad_loss, Tensor pred, Tensor target, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(tdiff, CPU, m) {
  m.impl("weighted_mse_cpu", &weighted_mse_cpu);
  m.impl("weighted_mse_backward_cpu", &weighted_mse_backward_cpu);
}

}  // namespace tdiff
