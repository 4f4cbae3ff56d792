// Fused multistep solver update on CPU: out = c_x x + sum_k c_k h_k (K = 1..4 history buffers), one coefficient
// row per sample; optionally h_0 = uncond + w (cond - uncond) (classifier-free guidance), written out as well.
// The backward gives grad_x = c_x g, grad_h_k = c_k g and the per-sample dot products grad_c = <g, input>.
// Memory-bound: each input is read once and each output written once.
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

constexpr int kMaxHistory = 4;

// out[j] = c[0] x[j] + sum_k c[k+1] h_k[j] over one contiguous span; with CFG, h_0 is formed from cond = h[0],
// uncond and w, and stored into guided[j].
template <typename scalar_t, int K, bool CFG>
void combine_span(const scalar_t* __restrict__ x, const scalar_t* const* h, const scalar_t* __restrict__ u,
                  scalar_t* __restrict__ out, scalar_t* __restrict__ guided, const at::opmath_type<scalar_t>* c,
                  at::opmath_type<scalar_t> w, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t W = Vec::size();
    const Vec vw(w);
    for (; j + W <= n; j += W) {
      Vec acc = Vec(c[0]) * Vec::loadu(x + j);
      Vec h0 = Vec::loadu(h[0] + j);
      if constexpr (CFG) {
        const Vec vu = Vec::loadu(u + j);
        h0 = at::vec::fmadd(vw, h0 - vu, vu);
        h0.store(guided + j);
      }
      acc = at::vec::fmadd(Vec(c[1]), h0, acc);
      for (int k = 1; k < K; ++k) acc = at::vec::fmadd(Vec(c[k + 1]), Vec::loadu(h[k] + j), acc);
      acc.store(out + j);
    }
  }
  // the tail, and the whole span for bfloat16 / half (widened to float; the compiler vectorises this loop)
#pragma omp simd
  for (int64_t i = j; i < n; ++i) {
    acc_t h0 = static_cast<acc_t>(h[0][i]);
    if constexpr (CFG) {
      const acc_t uu = static_cast<acc_t>(u[i]);
      h0 = uu + w * (h0 - uu);
      guided[i] = static_cast<scalar_t>(h0);
    }
    acc_t acc = c[0] * static_cast<acc_t>(x[i]) + c[1] * h0;
    for (int k = 1; k < K; ++k) acc += c[k + 1] * static_cast<acc_t>(h[k][i]);
    out[i] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, int K, bool CFG>
void combine_rows(const at::Tensor& x, const std::vector<at::Tensor>& hist, const at::Tensor* uncond,
                  const at::Tensor& coeffs, const at::Tensor* scale, at::Tensor& out, at::Tensor* guided) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0);
  const int64_t n = x.numel() / batch;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* hp[kMaxHistory] = {nullptr, nullptr, nullptr, nullptr};
  for (int k = 0; k < K; ++k) hp[k] = hist[k].data_ptr<scalar_t>();
  const scalar_t* up = CFG ? uncond->data_ptr<scalar_t>() : nullptr;
  const acc_t* cp = coeffs.data_ptr<acc_t>();
  const acc_t* wp = CFG ? scale->data_ptr<acc_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* gp = CFG ? guided->data_ptr<scalar_t>() : nullptr;
  parallel_row_spans(batch, n, kSpanChunk, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
    const scalar_t* hs[kMaxHistory];
    for (int k = 0; k < K; ++k) hs[k] = hp[k] + lo;
    combine_span<scalar_t, K, CFG>(xp + lo, hs, CFG ? up + lo : nullptr, op + lo, CFG ? gp + lo : nullptr,
                                   cp + b * (K + 1), CFG ? wp[b] : acc_t(0), len);
  });
}

void check_inputs(const char* op, const at::Tensor& x, const std::vector<at::Tensor>& hist, const at::Tensor& coeffs) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(0) > 0, op, ": x must have a non-empty batch dimension");
  const int64_t k = static_cast<int64_t>(hist.size());
  TORCH_CHECK(k >= 1 && k <= kMaxHistory, op, ": history must hold 1 to 4 tensors");
  for (const auto& h : hist) {
    TORCH_CHECK(h.sizes() == x.sizes() && h.scalar_type() == x.scalar_type() && h.device() == x.device(), op,
                ": every history tensor must have the shape, dtype and device of x");
    TORCH_CHECK(h.is_contiguous(), op, ": history tensors must be contiguous");
  }
  TORCH_CHECK(x.is_contiguous() && coeffs.is_contiguous(), op, ": x and coeffs must be contiguous");
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == x.size(0) && coeffs.size(1) == k + 1, op,
              ": coeffs must have shape (B, 1+K)");
  TORCH_CHECK(coeffs.scalar_type() == acc, op, ": coeffs must be float64 for float64 data and float32 otherwise");
}

template <bool CFG>
void dispatch_combine(const at::Tensor& x, const std::vector<at::Tensor>& hist, const at::Tensor* uncond,
                      const at::Tensor& coeffs, const at::Tensor* scale, at::Tensor& out, at::Tensor* guided) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "multistep_update_cpu", [&] {
    switch (hist.size()) {
      case 1: combine_rows<scalar_t, 1, CFG>(x, hist, uncond, coeffs, scale, out, guided); break;
      case 2: combine_rows<scalar_t, 2, CFG>(x, hist, uncond, coeffs, scale, out, guided); break;
      case 3: combine_rows<scalar_t, 3, CFG>(x, hist, uncond, coeffs, scale, out, guided); break;
      default: combine_rows<scalar_t, 4, CFG>(x, hist, uncond, coeffs, scale, out, guided); break;
    }
  });
}

at::Tensor multistep_update_cpu(const at::Tensor& x, at::TensorList history, const at::Tensor& coeffs) {
  const std::vector<at::Tensor> hist(history.begin(), history.end());
  check_inputs("multistep_update_cpu", x, hist, coeffs);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  dispatch_combine<false>(x, hist, nullptr, coeffs, nullptr, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> multistep_update_cfg_cpu(const at::Tensor& x, at::TensorList history,
                                                            const at::Tensor& coeffs, const at::Tensor& uncond,
                                                            const at::Tensor& scale) {
  const std::vector<at::Tensor> hist(history.begin(), history.end());
  check_inputs("multistep_update_cfg_cpu", x, hist, coeffs);
  TORCH_CHECK(uncond.sizes() == x.sizes() && uncond.scalar_type() == x.scalar_type() && uncond.is_contiguous(),
              "multistep_update_cfg_cpu: uncond must be contiguous with the shape and dtype of x");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == x.size(0) && scale.scalar_type() == coeffs.scalar_type() &&
                  scale.is_contiguous(),
              "multistep_update_cfg_cpu: scale must be a contiguous (B,) tensor of the coeffs' dtype");
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor guided = at::empty_like(x, at::MemoryFormat::Contiguous);
  dispatch_combine<true>(x, hist, &uncond, coeffs, &scale, out, &guided);
  return {out, guided};
}

// Backward over one span: writes c-scaled copies of g and returns the 1+K dot products <g, input> of the span.
template <typename scalar_t, int K>
void backward_span(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, const scalar_t* const* h,
                   scalar_t* __restrict__ gx, scalar_t* const* gh, const at::opmath_type<scalar_t>* c, int64_t n,
                   at::opmath_type<scalar_t>* dots) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t d[K + 1];
  for (int k = 0; k <= K; ++k) d[k] = acc_t(0);
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t W = Vec::size();
    Vec vd[K + 1];
    for (int k = 0; k <= K; ++k) vd[k] = Vec(acc_t(0));
    for (; j + W <= n; j += W) {
      const Vec vg = Vec::loadu(g + j);
      (Vec(c[0]) * vg).store(gx + j);
      vd[0] = at::vec::fmadd(vg, Vec::loadu(x + j), vd[0]);
      for (int k = 0; k < K; ++k) {
        (Vec(c[k + 1]) * vg).store(gh[k] + j);
        vd[k + 1] = at::vec::fmadd(vg, Vec::loadu(h[k] + j), vd[k + 1]);
      }
    }
    for (int k = 0; k <= K; ++k)
      d[k] = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vd[k]);
  }
  for (; j < n; ++j) {
    const acc_t gj = static_cast<acc_t>(g[j]);
    gx[j] = static_cast<scalar_t>(c[0] * gj);
    d[0] += gj * static_cast<acc_t>(x[j]);
    for (int k = 0; k < K; ++k) {
      gh[k][j] = static_cast<scalar_t>(c[k + 1] * gj);
      d[k + 1] += gj * static_cast<acc_t>(h[k][j]);
    }
  }
  for (int k = 0; k <= K; ++k) dots[k] = d[k];
}

template <typename scalar_t, int K>
void backward_rows(const at::Tensor& grad, const at::Tensor& x, const std::vector<at::Tensor>& hist,
                   const at::Tensor& coeffs, at::Tensor& gx, std::vector<at::Tensor>& gh, at::Tensor& gc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0);
  const int64_t n = x.numel() / batch;
  const int64_t chunks = spans_per_sample(n, kSpanChunk);
  at::Tensor partial = at::empty({batch, chunks, K + 1}, coeffs.options());
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* hp[kMaxHistory];
  scalar_t* ghp[kMaxHistory];
  for (int k = 0; k < K; ++k) {
    hp[k] = hist[k].data_ptr<scalar_t>();
    ghp[k] = gh[k].data_ptr<scalar_t>();
  }
  const acc_t* cp = coeffs.data_ptr<acc_t>();
  acc_t* pp = partial.data_ptr<acc_t>();
  scalar_t* gxp = gx.data_ptr<scalar_t>();
  parallel_row_spans(batch, n, kSpanChunk, [&](int64_t task, int64_t b, int64_t lo, int64_t len) {
    const scalar_t* hs[kMaxHistory];
    scalar_t* ghs[kMaxHistory];
    for (int k = 0; k < K; ++k) {
      hs[k] = hp[k] + lo;
      ghs[k] = ghp[k] + lo;
    }
    backward_span<scalar_t, K>(gp + lo, xp + lo, hs, gxp + lo, ghs, cp + b * (K + 1), len, pp + task * (K + 1));
  });
  sum_span_partials(pp, batch, chunks, K + 1, gc.data_ptr<acc_t>());
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> multistep_update_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, at::TensorList history, const at::Tensor& coeffs) {
  const std::vector<at::Tensor> hist(history.begin(), history.end());
  check_inputs("multistep_update_backward_cpu", x, hist, coeffs);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous(),
              "multistep_update_backward_cpu: grad must be contiguous with the shape and dtype of x");
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  std::vector<at::Tensor> gh;
  for (size_t k = 0; k < hist.size(); ++k) gh.push_back(at::empty_like(x, at::MemoryFormat::Contiguous));
  at::Tensor gc = at::empty_like(coeffs, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "multistep_update_backward_cpu", [&] {
    switch (hist.size()) {
      case 1: backward_rows<scalar_t, 1>(grad, x, hist, coeffs, gx, gh, gc); break;
      case 2: backward_rows<scalar_t, 2>(grad, x, hist, coeffs, gx, gh, gc); break;
      case 3: backward_rows<scalar_t, 3>(grad, x, hist, coeffs, gx, gh, gc); break;
      default: backward_rows<scalar_t, 4>(grad, x, hist, coeffs, gx, gh, gc); break;
    }
  });
  return {gx, gh, gc};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tdiff, m) {
  m.def("multistep_update_cpu(Tensor x, Tensor[] history, Tensor coeffs) -> Tensor");
  m.def(
      "multistep_update_backward_cpu(Tensor grad, Tensor x, Tensor[] history, Tensor coeffs) "
      "-> (Tensor, Tensor[], Tensor)");
  m.def(
      "multistep_update_cfg_cpu(Tensor x, Tensor[] history, Tensor coeffs, Tensor uncond, Tensor scale) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tdiff, CPU, m) {
  m.impl("multistep_update_cpu", &multistep_update_cpu);
  m.impl("multistep_update_backward_cpu", &multistep_update_backward_cpu);
  m.impl("multistep_update_cfg_cpu", &multistep_update_cfg_cpu);
}

}  // namespace tdiff
