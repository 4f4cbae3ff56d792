// Fused multistep solver update on CPU: out = c_x x + c_0 m' + sum_{k>=1} c_k h_k (K = 1..4 history buffers), one
// coefficient row per sample (or one shared row). In the convert form, history[0] is the raw model output m and
//   m' = u + w (m - u)   with classifier-free guidance (uncond u, scale w),
//   m' = p src + q m'    with the prediction conversion (convert rows [p, q]; src the sample the network saw),
// and m' (the data prediction to keep as history) is written out too. The backward gives grad_x = c_x g,
// grad_h_k = c_k g and the per-sample dot products grad_c = <g, input>. Memory-bound: each input is read once and
// each output written once; the span loops are in csrc/loops/multistep_update.h.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_kernels.h"
#include "direct.h"
#include "outputs.h"
#include "row_spans.h"

#include <c10/util/SmallVector.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace tdiff {
namespace {

// The history made contiguous: at most kMaxHistory tensors, held inline (no heap allocation per call).
using History = c10::SmallVector<at::Tensor, kMaxHistory>;

// x, history and coeffs; returns the history, each made contiguous.
History check_update(const char* op, const at::Tensor& x, at::TensorList history, const at::Tensor& coeffs,
                     bool shared_row) {
  check_data(op, "x", x);
  check_batch(op, "x", x);
  const int64_t k = static_cast<int64_t>(history.size());
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxHistory, op, ": history must hold 1 to ", kMaxHistory, " tensors, got ", k);
  // the names as literals: no string is built per call (check_like formats them only when a check fails)
  static_assert(kMaxHistory == 4, "one name per history slot");
  static constexpr const char* kNames[kMaxHistory] = {"history[0]", "history[1]", "history[2]", "history[3]"};
  History hist;
  for (int64_t i = 0; i < k; ++i) {
    check_like(op, kNames[i], history[i], "x", x);
    hist.push_back(history[i].contiguous());
  }
  check_rows(op, "coeffs", coeffs, x.size(0), k + 1, shared_row, at::toOpMathType(x.scalar_type()));
  return hist;
}

struct Optional {
  const at::Tensor* uncond = nullptr;
  const at::Tensor* scale = nullptr;
  const at::Tensor* src = nullptr;
  const at::Tensor* convert = nullptr;
};

template <typename T>
void run_update(const at::Tensor& x, at::TensorList hist, const at::Tensor& coeffs,
                const Optional& opt, at::Tensor& out, at::Tensor* h0) {
  using acc_t = at::opmath_type<T>;
  const auto& kern = kernels_for<T>();
  const int k = static_cast<int>(hist.size());
  const int64_t batch = x.size(0);
  const int64_t n = batch ? x.numel() / batch : 0;
  const int64_t row_stride = coeffs.dim() == 1 ? 0 : k + 1;
  const acc_t* cp = coeffs.data_ptr<acc_t>();
  const acc_t* wp = opt.scale ? opt.scale->data_ptr<acc_t>() : nullptr;
  const int64_t w_stride = opt.scale && opt.scale->dim() == 1 ? 1 : 0;
  const acc_t* pq = opt.convert ? opt.convert->data_ptr<acc_t>() : nullptr;
  const int64_t pq_stride = opt.convert && opt.convert->dim() == 2 ? 2 : 0;
  const T* xp = x.data_ptr<T>();
  const T* up = opt.uncond ? opt.uncond->data_ptr<T>() : nullptr;
  const T* sp = opt.src ? opt.src->data_ptr<T>() : nullptr;
  const T* hp[kMaxHistory] = {nullptr, nullptr, nullptr, nullptr};
  for (int i = 0; i < k; ++i) hp[i] = hist[i].data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* h0p = h0 ? h0->data_ptr<T>() : nullptr;
  parallel_row_spans(batch, n, kSpanChunk, [&](int64_t, int64_t b, int64_t lo, int64_t len) {
    MultistepSpan<T> a{};
    a.x = xp + lo;
    for (int i = 0; i < k; ++i) a.h[i] = hp[i] + lo;
    a.uncond = up ? up + lo : nullptr;
    a.src = sp ? sp + lo : nullptr;
    a.out = op + lo;
    a.h0 = h0p ? h0p + lo : nullptr;
    a.c = cp + b * row_stride;
    a.w = wp ? wp[b * w_stride] : acc_t(0);
    a.p = pq ? pq[b * pq_stride] : acc_t(0);
    a.q = pq ? pq[b * pq_stride + 1] : acc_t(0);
    a.k = k;
    a.cfg = up != nullptr;
    a.convert = pq != nullptr;
    a.n = len;
    kern.multistep(a);
  });
}

at::Tensor multistep_update_cpu(const at::Tensor& x_in, at::TensorList history, const at::Tensor& coeffs_in) {
  const char* op = "tdiff::multistep_update_cpu";
  const History hist = check_update(op, x_in, history, coeffs_in, /*shared_row=*/true);
  const at::Tensor x = x_in.contiguous(), coeffs = coeffs_in.contiguous();
  at::Tensor out = new_cpu_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "multistep_update",
                                  [&] { run_update<scalar_t>(x, hist, coeffs, Optional{}, out, nullptr); });
  return out;
}

// The converting update written into out (and h_0 into *h0, when given): the one body of the functional op and
// of the out= form, so both validate alike.
void convert_into(const char* op, const at::Tensor& x_in, at::TensorList history, const at::Tensor& coeffs_in,
                  const std::optional<at::Tensor>& uncond_in, const std::optional<at::Tensor>& scale_in,
                  const std::optional<at::Tensor>& src_in, const std::optional<at::Tensor>& convert_in,
                  at::Tensor& out, at::Tensor* h0) {
  const History hist = check_update(op, x_in, history, coeffs_in, /*shared_row=*/true);
  const bool cfg = uncond_in.has_value() && uncond_in->defined();
  const bool has_scale = scale_in.has_value() && scale_in->defined();
  const bool conv = convert_in.has_value() && convert_in->defined();
  const bool has_src = src_in.has_value() && src_in->defined();
  TORCH_CHECK_VALUE(cfg == has_scale, op, ": uncond and scale must be given together (classifier-free guidance)");
  TORCH_CHECK_VALUE(!has_src || conv, op, ": src is the sample the model saw and needs convert rows [p, q]");
  const auto acc = at::toOpMathType(x_in.scalar_type());
  at::Tensor uncond, scale, src, convert;
  Optional opt;
  if (cfg) {
    check_like(op, "uncond", *uncond_in, "history[0] (cond)", history[0]);
    check_rows(op, "scale", *scale_in, x_in.size(0), 0, /*shared=*/true, acc);
    uncond = uncond_in->contiguous();
    scale = scale_in->contiguous();
    opt.uncond = &uncond;
    opt.scale = &scale;
  }
  const at::Tensor x = x_in.contiguous(), coeffs = coeffs_in.contiguous();
  if (conv) {
    check_rows(op, "convert", *convert_in, x_in.size(0), 2, /*shared=*/true, acc);
    convert = convert_in->contiguous();
    opt.convert = &convert;
    if (has_src) {
      check_like(op, "src", *src_in, "x", x_in);
      src = src_in->contiguous();
    } else {
      src = x;  // the network saw x itself
    }
    opt.src = &src;
  }
  if (h0 && !cfg && !conv) h0->copy_(hist[0]);  // m' = m: the loop below does not write it
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "multistep_update", [&] {
    run_update<scalar_t>(x, hist, coeffs, opt, out, (cfg || conv) ? h0 : nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor> multistep_update_convert_cpu(
    const at::Tensor& x_in, at::TensorList history, const at::Tensor& coeffs_in,
    const std::optional<at::Tensor>& uncond_in, const std::optional<at::Tensor>& scale_in,
    const std::optional<at::Tensor>& src_in, const std::optional<at::Tensor>& convert_in) {
  at::Tensor out = new_cpu_like(x_in);
  at::Tensor h0 = new_cpu_like(x_in);
  convert_into("tdiff::multistep_update_convert_cpu", x_in, history, coeffs_in, uncond_in, scale_in, src_in,
               convert_in, out, &h0);
  return {out, h0};
}

// An output buffer of the out= form: shaped like x, contiguous, and either sharing no memory with an input or being
// one of them exactly (the same memory in the same layout: the sampling loop's update in place, which the span loops
// compute exactly, reading every input's element j before writing element j). A partial overlap would be a bug in
// the caller, never something to compute through; `disjoint` (h0's out) must share no memory at all.
void check_out(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, at::TensorList inputs,
               const at::Tensor* disjoint = nullptr) {
  check_like(op, name, t, "x", x);
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
  for (const auto& in : inputs) {
    // another storage cannot overlap (get_overlap_status would say TooHard for a strided input, such as the
    // first channels of a learned-sigma model's output, without looking at its storage)
    if (in.defined() && in.has_storage() && t.storage().is_alias_of(in.storage())) {
      const auto overlap = at::get_overlap_status(t, in);
      TORCH_CHECK_VALUE(overlap == at::MemOverlapStatus::No || overlap == at::MemOverlapStatus::Full, op, ": ", name,
                        " must not share memory with an input unless it is that input exactly (an update in place)");
    }
  }
  TORCH_CHECK_VALUE(!disjoint || at::get_overlap_status(t, *disjoint) == at::MemOverlapStatus::No, op, ": ", name,
                    " must not share memory with out");
}

// The update written into caller-owned buffers: out (x_next) and, with guidance or a conversion, h0 (h_0). The
// eager no-grad sampling loop's buffer reuse (no fresh multi-MiB outputs, so no page faults, every step).
void multistep_update_out_cpu(const at::Tensor& x, at::TensorList history, const at::Tensor& coeffs,
                              const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& src, const std::optional<at::Tensor>& convert,
                              at::Tensor out, const std::optional<at::Tensor>& h0) {
  const char* op = "tdiff::multistep_update_out_cpu";
  check_data(op, "x", x);
  c10::SmallVector<at::Tensor, kMaxHistory + 3> inputs(history.begin(), history.end());
  inputs.push_back(x);
  for (const auto* t : {&uncond, &src}) {
    if (t->has_value()) inputs.push_back(**t);
  }
  check_out(op, "out", out, x, inputs);
  const bool converts = (uncond.has_value() && uncond->defined()) || (convert.has_value() && convert->defined());
  const bool has_h0 = h0.has_value() && h0->defined();
  TORCH_CHECK_VALUE(has_h0 == converts, op, ": h0 must be given exactly when guidance or a conversion forms h_0");
  at::Tensor h0_out;
  if (has_h0) {
    h0_out = *h0;
    check_out(op, "h0", h0_out, x, inputs, &out);
  }
  convert_into(op, x, history, coeffs, uncond, scale, src, convert, out, has_h0 ? &h0_out : nullptr);
}

template <typename T>
void run_backward(const at::Tensor& grad, const at::Tensor& x, at::TensorList hist,
                  const at::Tensor& coeffs, at::Tensor& gx, std::vector<at::Tensor>& gh, at::Tensor& gc) {
  using acc_t = at::opmath_type<T>;
  const auto& kern = kernels_for<T>();
  const int k = static_cast<int>(hist.size());
  const int64_t batch = x.size(0);
  const int64_t n = x.numel() / batch;
  const int64_t spans = spans_per_sample(n, kSpanChunk);
  at::Tensor partial = at::zeros({batch, spans, k + 1}, coeffs.options());
  const T* gp = grad.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* hp[kMaxHistory] = {nullptr, nullptr, nullptr, nullptr};
  T* ghp[kMaxHistory] = {nullptr, nullptr, nullptr, nullptr};
  for (int i = 0; i < k; ++i) {
    hp[i] = hist[i].data_ptr<T>();
    ghp[i] = gh[i].data_ptr<T>();
  }
  const acc_t* cp = coeffs.data_ptr<acc_t>();
  acc_t* pp = partial.data_ptr<acc_t>();
  T* gxp = gx.data_ptr<T>();
  parallel_row_spans(batch, n, kSpanChunk, [&](int64_t task, int64_t b, int64_t lo, int64_t len) {
    MultistepBackwardSpan<T> a{};
    a.g = gp + lo;
    a.x = xp + lo;
    for (int i = 0; i < k; ++i) {
      a.h[i] = hp[i] + lo;
      a.gh[i] = ghp[i] + lo;
    }
    a.gx = gxp + lo;
    a.c = cp + b * (k + 1);
    a.dots = pp + task * (k + 1);
    a.k = k;
    a.n = len;
    kern.multistep_backward(a);
  });
  sum_span_partials(pp, batch, spans, k + 1, gc.data_ptr<acc_t>());
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> multistep_update_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, at::TensorList history, const at::Tensor& coeffs_in) {
  const char* op = "tdiff::multistep_update_backward_cpu";
  const History hist = check_update(op, x_in, history, coeffs_in, /*shared_row=*/false);
  check_like(op, "grad", grad_in, "x", x_in);
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), coeffs = coeffs_in.contiguous();
  at::Tensor gx = at::empty_like(x);
  std::vector<at::Tensor> gh;
  for (size_t i = 0; i < hist.size(); ++i) gh.push_back(at::empty_like(x));
  at::Tensor gc = at::empty_like(coeffs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "multistep_update",
                                  [&] { run_backward<scalar_t>(grad, x, hist, coeffs, gx, gh, gc); });
  return {gx, gh, gc};
}

}  // namespace

namespace direct {
at::Tensor multistep_update_cpu(const at::Tensor& x, at::TensorList history, const at::Tensor& coeffs) {
  return ::tdiff::multistep_update_cpu(x, history, coeffs);
}
std::tuple<at::Tensor, at::Tensor> multistep_update_convert_cpu(
    const at::Tensor& x, at::TensorList history, const at::Tensor& coeffs, const std::optional<at::Tensor>& uncond,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& src,
    const std::optional<at::Tensor>& convert) {
  return ::tdiff::multistep_update_convert_cpu(x, history, coeffs, uncond, scale, src, convert);
}
void multistep_update_out_cpu(const at::Tensor& x, at::TensorList history, const at::Tensor& coeffs,
                              const std::optional<at::Tensor>& uncond, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& src, const std::optional<at::Tensor>& convert,
                              const at::Tensor& out, const std::optional<at::Tensor>& h0) {
  ::tdiff::multistep_update_out_cpu(x, history, coeffs, uncond, scale, src, convert, out, h0);
}
}  // namespace direct

TORCH_LIBRARY_FRAGMENT(tdiff, m) {
  m.def("multistep_update_cpu(Tensor x, Tensor[] history, Tensor coeffs) -> Tensor");
  m.def(
      "multistep_update_convert_cpu(Tensor x, Tensor[] history, Tensor coeffs, Tensor? uncond=None, "
      "Tensor? scale=None, Tensor? src=None, Tensor? convert=None) -> (Tensor, Tensor)");
  m.def(
      "multistep_update_out_cpu(Tensor x, Tensor[] history, Tensor coeffs, Tensor? uncond, Tensor? scale, "
      "Tensor? src, Tensor? convert, Tensor(a!) out, Tensor(b!)? h0) -> ()");
  m.def(
      "multistep_update_backward_cpu(Tensor grad, Tensor x, Tensor[] history, Tensor coeffs) "
      "-> (Tensor, Tensor[], Tensor)");
}

TORCH_LIBRARY_IMPL(tdiff, CPU, m) {
  m.impl("multistep_update_cpu", &multistep_update_cpu);
  m.impl("multistep_update_convert_cpu", &multistep_update_convert_cpu);
  m.impl("multistep_update_out_cpu", &multistep_update_out_cpu);
  m.impl("multistep_update_backward_cpu", &multistep_update_backward_cpu);
}

}  // namespace tdiff
