// Fused cached-block scatter on CPU: branch = fresh[source[b]] or cache[b], out = x + gate[b] * branch.
// One pass; each (sample, token) row of C channels picks its source pointer once, then a vector loop
// (csrc/loops/cached_block.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_kernels.h"
#include "direct.h"
#include "row_spans.h"

#include <algorithm>
#include <tuple>

namespace tdiff {
namespace {

// x (B, N, C), gate (B, C), fresh (K, N, C), cache like x, source (B,) as checks.h's check_source says.
void check_block(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& gate, int64_t fresh_rows) {
  check_data(op, x_name, x);
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) > 0, op, ": ", x_name, " must be (B, N, C) with B > 0, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(gate.defined() && gate.dim() == 2 && gate.size(0) == x.size(0) && gate.size(1) == x.size(2), op,
                    ": gate must have shape (", x.size(0), ", ", x.size(2), "), got ",
                    gate.defined() ? gate.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(gate.scalar_type() == x.scalar_type() && gate.device() == x.device(), op,
                    ": gate must have the dtype and device of ", x_name, " (", x.scalar_type(), ", ", x.device(),
                    "), got ", gate.scalar_type(), ", ", gate.device());
  TORCH_CHECK_VALUE(fresh_rows >= 0 && fresh_rows <= x.size(0), op, ": the number of fresh rows must be in [0, ",
                    x.size(0), "], got ", fresh_rows);
}

std::tuple<at::Tensor, at::Tensor> cached_block_cpu(const at::Tensor& x_in, const at::Tensor& gate_in,
                                                    const at::Tensor& fresh_in, const at::Tensor& cache_in,
                                                    const at::Tensor& source_in) {
  const char* op = "tdiff::cached_block_cpu";
  TORCH_CHECK_VALUE(fresh_in.defined() && x_in.defined(), op, ": x and fresh must be tensors");
  TORCH_CHECK_VALUE(fresh_in.dim() == 3, op, ": fresh must have shape (K, ", x_in.dim() == 3 ? x_in.size(1) : -1, ", ",
                    x_in.dim() == 3 ? x_in.size(2) : -1, ") (the computing rows), got ", fresh_in.sizes());
  check_block(op, "x", x_in, gate_in, fresh_in.size(0));
  check_like(op, "cache", cache_in, "x", x_in);
  TORCH_CHECK_VALUE(fresh_in.size(1) == x_in.size(1) && fresh_in.size(2) == x_in.size(2), op,
                    ": fresh must have shape (K, ", x_in.size(1), ", ", x_in.size(2), "), got ", fresh_in.sizes());
  TORCH_CHECK_VALUE(fresh_in.scalar_type() == x_in.scalar_type() && fresh_in.device() == x_in.device(), op,
                    ": fresh must have the dtype and device of x (", x_in.scalar_type(), ", ", x_in.device(),
                    "), got ", fresh_in.scalar_type(), ", ", fresh_in.device());
  check_source(op, source_in, x_in.size(0), fresh_in.size(0));
  const at::Tensor x = x_in.contiguous(), gate = gate_in.contiguous(), fresh = fresh_in.contiguous();
  const at::Tensor cache = cache_in.contiguous(), source = source_in.contiguous();
  const int64_t batch = x.size(0), tokens = x.size(1), channels = x.size(2);
  at::Tensor out = at::empty_like(x);
  at::Tensor branch = at::empty_like(x);
  const int64_t* sp = source.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cached_block", [&] {
    using T = scalar_t;
    const auto& kern = kernels_for<T>();
    const T* xp = x.data_ptr<T>();
    const T* gp = gate.data_ptr<T>();
    const T* fp = fresh.numel() ? fresh.data_ptr<T>() : nullptr;
    const T* cp = cache.data_ptr<T>();
    T* op_ = out.data_ptr<T>();
    T* bp = branch.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(channels, 1));
    at::parallel_for(0, batch * tokens, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / tokens, n = r % tokens;
        const int64_t src = sp[b];
        CachedBlockRow<T> a{};
        a.x = xp + r * channels;
        a.gate = gp + b * channels;
        // the row's branch comes from the freshly computed rows or from this sample's cache
        a.branch_in = src >= 0 ? fp + (src * tokens + n) * channels : cp + r * channels;
        a.out = op_ + r * channels;
        a.branch_out = bp + r * channels;
        a.c = channels;
        kern.cached_block(a);
      }
    });
  });
  return {out, branch};
}

// Backward: with d = grad_out * gate + grad_branch (the gradient reaching the selected branch),
//   grad_x = grad_out, grad_gate[b] = sum_n grad_out[b, n] * branch[b, n],
//   grad_fresh[source[b]] = d[b] for computing rows, grad_cache[b] = d[b] for reusing rows (0 otherwise).
// Parallel over (sample, block of tokens); each block sums its grad_gate share into its own row of partial sums,
// and the blocks' shares are added in a fixed order (deterministic for any thread count).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cached_block_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& grad_branch_in, const at::Tensor& gate_in,
    const at::Tensor& branch_in, const at::Tensor& source_in, int64_t computed) {
  const char* op = "tdiff::cached_block_backward_cpu";
  check_block(op, "grad_out", grad_out_in, gate_in, computed);
  check_like(op, "grad_branch", grad_branch_in, "grad_out", grad_out_in);
  check_like(op, "branch", branch_in, "grad_out", grad_out_in);
  check_source(op, source_in, grad_out_in.size(0), computed);
  const at::Tensor gout = grad_out_in.contiguous(), gbr = grad_branch_in.contiguous();
  const at::Tensor gate = gate_in.contiguous(), branch = branch_in.contiguous(), source = source_in.contiguous();
  const int64_t batch = gout.size(0), tokens = gout.size(1), channels = gout.size(2);
  const int64_t chunk = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(channels, 1));
  const int64_t blocks = std::max<int64_t>(1, (tokens + chunk - 1) / chunk);
  const auto acc_type = at::toOpMathType(gout.scalar_type());
  at::Tensor partial = at::zeros({batch, blocks, channels}, gout.options().dtype(acc_type));
  at::Tensor gx = at::empty_like(gout), gcache = at::empty_like(gout);
  at::Tensor gfresh = at::empty({computed, tokens, channels}, gout.options());
  const int64_t* sp = source.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gout.scalar_type(), "cached_block", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    const auto& kern = kernels_for<T>();
    const T* gop = gout.data_ptr<T>();
    const T* gbp = gbr.data_ptr<T>();
    const T* gp = gate.data_ptr<T>();
    const T* bp = branch.data_ptr<T>();
    T* gxp = gx.data_ptr<T>();
    T* gcp = gcache.data_ptr<T>();
    T* gfp = computed ? gfresh.data_ptr<T>() : nullptr;
    acc_t* pp = partial.data_ptr<acc_t>();
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, blk = task % blocks;
        const int64_t src = sp[b];
        for (int64_t n = blk * chunk; n < std::min(tokens, (blk + 1) * chunk); ++n) {
          const int64_t r = (b * tokens + n) * channels;
          CachedBlockBackwardRow<T> a{};
          a.gout = gop + r;
          a.gbr = gbp + r;
          a.gate = gp + b * channels;
          a.branch = bp + r;
          a.gx = gxp + r;
          a.to = src >= 0 ? gfp + (src * tokens + n) * channels : gcp + r;
          a.zero = src >= 0 ? gcp + r : nullptr;
          a.gate_acc = pp + task * channels;
          a.c = channels;
          kern.cached_block_backward(a);
        }
      }
    });
  });
  at::Tensor ggate_acc = at::empty({batch, channels}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "cached_block", [&] {
    sum_span_partials(partial.data_ptr<scalar_t>(), batch, blocks, channels, ggate_acc.data_ptr<scalar_t>());
  });
  return {gx, ggate_acc.to(gout.scalar_type()), gfresh, gcache};
}

}  // namespace

namespace direct {
std::tuple<at::Tensor, at::Tensor> cached_block_cpu(const at::Tensor& x, const at::Tensor& gate,
                                                    const at::Tensor& fresh, const at::Tensor& cache,
                                                    const at::Tensor& source) {
  return ::tdiff::cached_block_cpu(x, gate, fresh, cache, source);
}
}  // namespace direct

TORCH_LIBRARY_FRAGMENT(tdiff, m) {
  m.def("cached_block_cpu(Tensor x, Tensor gate, Tensor fresh, Tensor cache, Tensor source) -> (Tensor, Tensor)");
  m.def(
      "cached_block_backward_cpu(Tensor grad_out, Tensor grad_branch, Tensor gate, Tensor branch, Tensor source, "
      "int computed) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tdiff, CPU, m) {
  m.impl("cached_block_cpu", &cached_block_cpu);
  m.impl("cached_block_backward_cpu", &cached_block_backward_cpu);
}

}  // namespace tdiff
