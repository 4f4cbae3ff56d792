// Fused weighted per-sample MSE on CPU: loss_b = w_b * mean_j (pred_bj - target_bj)^2, and its backward
// grad_pred = (2 w_b g_b / N) (pred - target). Memory-bound: one read of pred and target, (B,) written.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "row_spans.h"

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

namespace tdiff {
namespace {

template <typename scalar_t, typename acc_t>
acc_t sum_sq_diff(const scalar_t* __restrict__ p, const scalar_t* __restrict__ q, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t W = Vec::size();
    Vec acc0(acc_t(0)), acc1(acc_t(0));
    int64_t j = 0;
    for (; j + 2 * W <= n; j += 2 * W) {  // two accumulators hide the FMA latency
      Vec d0 = Vec::loadu(p + j) - Vec::loadu(q + j);
      Vec d1 = Vec::loadu(p + j + W) - Vec::loadu(q + j + W);
      acc0 = at::vec::fmadd(d0, d0, acc0);
      acc1 = at::vec::fmadd(d1, d1, acc1);
    }
    acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1);
    for (; j < n; ++j) {
      const acc_t d = p[j] - q[j];
      s += d * d;
    }
    return s;
  } else {  // bfloat16 / half: widen each element to float, the compiler vectorises the reduction
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t d = static_cast<acc_t>(p[j]) - static_cast<acc_t>(q[j]);
      s += d * d;
    }
    return s;
  }
}

std::tuple<at::Tensor, at::Tensor> weighted_mse_cpu(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                    const at::Tensor& weight) {
  TORCH_CHECK(pred_in.device().is_cpu(), "weighted_mse_cpu: pred must be a CPU tensor");
  TORCH_CHECK(pred_in.sizes() == target_in.sizes(), "weighted_mse_cpu: target must have the shape of pred");
  TORCH_CHECK(pred_in.scalar_type() == target_in.scalar_type(), "weighted_mse_cpu: target must have pred's dtype");
  TORCH_CHECK(pred_in.dim() >= 1 && pred_in.numel() > 0, "weighted_mse_cpu: pred must be non-empty");
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t batch = pred.size(0);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == batch, "weighted_mse_cpu: weight must have shape (B,)");
  const int64_t n = pred.numel() / batch;
  const int64_t chunks = spans_per_sample(n, kSpanChunk);  // each row in spans; their sums added in a fixed order
  const auto acc_type = at::toOpMathType(pred.scalar_type());
  at::Tensor partial = at::empty({batch, chunks}, pred.options().dtype(acc_type));
  at::Tensor mse = at::empty({batch}, pred.options().dtype(acc_type));
  at::Tensor w = weight.to(acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "weighted_mse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* q = target.data_ptr<scalar_t>();
    acc_t* part = partial.data_ptr<acc_t>();
    parallel_row_spans(batch, n, kSpanChunk, [&](int64_t task, int64_t, int64_t lo, int64_t len) {
      part[task] = sum_sq_diff<scalar_t, acc_t>(p + lo, q + lo, len);
    });
    acc_t* m = mse.data_ptr<acc_t>();
    sum_span_partials(part, batch, chunks, 1, m);
    for (int64_t b = 0; b < batch; ++b) m[b] /= static_cast<acc_t>(n);
  });
  return {w * mse, mse};
}

at::Tensor weighted_mse_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& pred_in,
                                     const at::Tensor& target_in, const at::Tensor& weight) {
  TORCH_CHECK(pred_in.sizes() == target_in.sizes(), "weighted_mse_backward_cpu: target must have pred's shape");
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t batch = pred.size(0);
  const int64_t n = pred.numel() / batch;
  const auto acc_type = at::toOpMathType(pred.scalar_type());
  // per-sample scale 2 w g / N, B values
  const at::Tensor scale = (grad_loss.to(acc_type) * weight.to(acc_type) * (2.0 / static_cast<double>(n))).contiguous();
  at::Tensor grad = at::empty_like(pred);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "weighted_mse_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* q = target.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const acc_t* sc = scale.data_ptr<acc_t>();
    const int64_t total = batch * n;
    at::parallel_for(0, total, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {  // a chunk may span rows: walk it row by row, one scale per row
        const int64_t b = i / n;
        const int64_t row_end = std::min(end, (b + 1) * n);
        const acc_t s = sc[b];
        int64_t j = i;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          using Vec = at::vec::Vectorized<acc_t>;
          const Vec vs(s);
          for (; j + Vec::size() <= row_end; j += Vec::size())
            (vs * (Vec::loadu(p + j) - Vec::loadu(q + j))).store(g + j);
        }
        for (; j < row_end; ++j)
          g[j] = static_cast<scalar_t>(s * (static_cast<acc_t>(p[j]) - static_cast<acc_t>(q[j])));
        i = row_end;
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tdiff, m) {
  m.def("weighted_mse_cpu(Tensor pred, Tensor target, Tensor weight) -> (Tensor, Tensor)");
  m.def("weighted_mse_backward_cpu(Tensor grad_loss, Tensor pred, Tensor target, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(tdiff, CPU, m) {
  m.impl("weighted_mse_cpu", &weighted_mse_cpu);
  m.impl("weighted_mse_backward_cpu", &weighted_mse_backward_cpu);
}

}  // namespace tdiff
