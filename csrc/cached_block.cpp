// Fused cached-block scatter on CPU: branch = fresh[source[b]] or cache[b], out = x + gate[b] * branch.
// One pass; each (sample, token) row of C channels picks its source pointer once, then a vectorisable loop.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace tdiff {
namespace {

template <typename scalar_t>
void cached_block_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gate,
                       const scalar_t* __restrict__ fresh, const scalar_t* __restrict__ cache,
                       const int64_t* __restrict__ source, scalar_t* __restrict__ out, scalar_t* __restrict__ branch,
                       int64_t batch, int64_t tokens, int64_t channels) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = batch * tokens;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(channels, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / tokens;
      const int64_t n = r % tokens;
      const int64_t src = source[b];
      // the row's branch comes from the freshly computed rows or from this sample's cache
      const scalar_t* br = src >= 0 ? fresh + (src * tokens + n) * channels : cache + r * channels;
      const scalar_t* g = gate + b * channels;
      const scalar_t* xr = x + r * channels;
      scalar_t* o = out + r * channels;
      scalar_t* bo = branch + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const scalar_t v = br[c];
        bo[c] = v;
        o[c] = static_cast<scalar_t>(static_cast<acc_t>(xr[c]) + static_cast<acc_t>(g[c]) * static_cast<acc_t>(v));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cached_block_cpu(const at::Tensor& x_in, const at::Tensor& gate_in,
                                                    const at::Tensor& fresh_in, const at::Tensor& cache_in,
                                                    const at::Tensor& source_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "cached_block_cpu: x must be a CPU tensor");
  TORCH_CHECK(x_in.dim() == 3, "cached_block_cpu: x must be (B, N, C)");
  TORCH_CHECK(cache_in.sizes() == x_in.sizes(), "cached_block_cpu: cache must have the shape of x");
  TORCH_CHECK(source_in.scalar_type() == at::kLong, "cached_block_cpu: source must be int64");
  const at::Tensor x = x_in.contiguous(), gate = gate_in.contiguous(), fresh = fresh_in.contiguous();
  const at::Tensor cache = cache_in.contiguous(), source = source_in.contiguous();
  const int64_t batch = x.size(0), tokens = x.size(1), channels = x.size(2);
  TORCH_CHECK(gate.size(0) == batch && gate.size(1) == channels, "cached_block_cpu: gate must be (B, C)");
  const int64_t* sp = source.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(sp[b] < fresh.size(0), "cached_block_cpu: source index ", sp[b], " out of range for ",
                fresh.size(0), " fresh rows");
  at::Tensor out = at::empty_like(x);
  at::Tensor branch = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cached_block_cpu", [&] {
    cached_block_rows<scalar_t>(x.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(),
                                fresh.numel() ? fresh.data_ptr<scalar_t>() : nullptr, cache.data_ptr<scalar_t>(), sp,
                                out.data_ptr<scalar_t>(), branch.data_ptr<scalar_t>(), batch, tokens, channels);
  });
  return {out, branch};
}

// Backward: with d = grad_out * gate + grad_branch (the gradient reaching the selected branch),
//   grad_x = grad_out, grad_gate[b] = sum_n grad_out[b, n] * branch[b, n],
//   grad_fresh[source[b]] = d[b] for computing rows, grad_cache[b] = d[b] for reusing rows (0 otherwise).
// Parallel over samples, so the token reduction for grad_gate needs no atomics.
template <typename scalar_t>
void cached_block_backward_rows(const scalar_t* __restrict__ gout, const scalar_t* __restrict__ gbr,
                                const scalar_t* __restrict__ gate, const scalar_t* __restrict__ branch,
                                const int64_t* __restrict__ source, scalar_t* __restrict__ gx,
                                scalar_t* __restrict__ ggate, scalar_t* __restrict__ gfresh,
                                scalar_t* __restrict__ gcache, int64_t batch, int64_t tokens, int64_t channels) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(channels);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t src = source[b];
      const scalar_t* g = gate + b * channels;
      for (int64_t n = 0; n < tokens; ++n) {
        const int64_t r = (b * tokens + n) * channels;
        scalar_t* to = src >= 0 ? gfresh + (src * tokens + n) * channels : gcache + r;
        scalar_t* zero = src >= 0 ? gcache + r : nullptr;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t go = static_cast<acc_t>(gout[r + c]);
          gx[r + c] = gout[r + c];
          acc[c] += go * static_cast<acc_t>(branch[r + c]);
          to[c] = static_cast<scalar_t>(go * static_cast<acc_t>(g[c]) + static_cast<acc_t>(gbr[r + c]));
        }
        if (zero) std::fill(zero, zero + channels, scalar_t(0));
      }
      for (int64_t c = 0; c < channels; ++c) ggate[b * channels + c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cached_block_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& grad_branch_in, const at::Tensor& gate_in,
    const at::Tensor& branch_in, const at::Tensor& source_in, int64_t computed) {
  TORCH_CHECK(grad_out_in.dim() == 3, "cached_block_backward_cpu: grad_out must be (B, N, C)");
  TORCH_CHECK(grad_branch_in.sizes() == grad_out_in.sizes() && branch_in.sizes() == grad_out_in.sizes(),
              "cached_block_backward_cpu: grad_branch and branch must have the shape of grad_out");
  const at::Tensor gout = grad_out_in.contiguous(), gbr = grad_branch_in.contiguous();
  const at::Tensor gate = gate_in.contiguous(), branch = branch_in.contiguous(), source = source_in.contiguous();
  const int64_t batch = gout.size(0), tokens = gout.size(1), channels = gout.size(2);
  const int64_t* sp = source.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(sp[b] < computed, "cached_block_backward_cpu: source index ", sp[b], " out of range");
  at::Tensor gx = at::empty_like(gout), gcache = at::empty_like(gout);
  at::Tensor ggate = at::empty({batch, channels}, gout.options());
  at::Tensor gfresh = at::empty({computed, tokens, channels}, gout.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gout.scalar_type(), "cached_block_backward_cpu", [&] {
    cached_block_backward_rows<scalar_t>(gout.data_ptr<scalar_t>(), gbr.data_ptr<scalar_t>(),
                                         gate.data_ptr<scalar_t>(), branch.data_ptr<scalar_t>(), sp,
                                         gx.data_ptr<scalar_t>(), ggate.data_ptr<scalar_t>(),
                                         computed ? gfresh.data_ptr<scalar_t>() : nullptr, gcache.data_ptr<scalar_t>(),
                                         batch, tokens, channels);
  });
  return {gx, ggate, gfresh, gcache};
}

}  // namespace

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
