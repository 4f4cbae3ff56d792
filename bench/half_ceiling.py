"""The in-cache bandwidth ceiling of half precision with float accumulation, measured rather than estimated.

A fused op on float16 / bfloat16 data widens every element it loads to float and narrows every element it stores.
In cache those conversions, not the bytes, can bound the pass: this bench times passes that do only that (the op's
own loads and stores, csrc/loops/vec_io.h's IoAnyOrder at the same vector width and instruction set, with one add per
extra input so that no load is dead) against a vector copy of the same bytes, in the same interleaved rounds, and
the fused op's C++ kernel (through the dispatcher, in a C++ loop: no Python per call) beside them.

  convert-only / copy < 0.8 means the issue's 0.8-of-copy target is out of reach for any kernel that accumulates
  in float: the ceiling is the convert-only figure, and the op is judged against it (op / convert-only).

Stream shapes: the op's inputs and outputs (noisy_sample x_t: 2 in, 1 out; with the network input: 2 in, 2 out;
multistep_update K: K+1 in, 1 out), and a 1-in-1-out round trip. "In cache" is 16x4x32x32 (128 KiB a half tensor).
Before timing, the harness checks the library's bfloat16 narrowing (with AVX512_BF16, the hardware instruction
for steps without subnormal or NaN lanes) against torch's float -> bfloat16 conversion over all 2^32 float bit
patterns (2-5 minutes; --quick samples them), and fails if one differs.
The harness is built with torch.utils.cpp_extension.load_inline from csrc/ headers (a C++ compiler and ninja, no
network); it is a bench, never shipped in tdiff. One thread; medians over rounds with 95% intervals, ratios round
by round.
"""
from __future__ import annotations

import os
import time

import torch

from bench.common import load_average, median_ci, print_table, write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE, QUICK_SHAPE = (16, 4, 32, 32), (4, 4, 32, 32)
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mbmi2"],
             "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"]}

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <chrono>
#include <vector>

#include "cpu_kernels.h"

namespace harness {
#include "loops/vec_io.h"
#include "loops/multistep_update.h"
#include "loops/noisy_sample.h"

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// NIN inputs loaded and widened as the fused ops load them, summed (one add per extra input), narrowed and stored to
// NOUT outputs: the conversions and the bytes of the op, none of its arithmetic. Each output gets its own values
// (one more add each), as the op's do: the same value stored twice would be narrowed once.
template <typename T, int NIN, int NOUT>
void convert_pass(const std::vector<const T*>& in, const std::vector<T*>& out, int64_t n) {
  using IO = IoAnyOrder<T>;
  using V = typename IO::V;
  constexpr int P = IO::P;
  const T* ip[NIN];
  T* op[NOUT];
  for (int i = 0; i < NIN; ++i) ip[i] = in[i];
  for (int o = 0; o < NOUT; ++o) op[o] = out[o];
  for_each_step<T>(n, [&](int64_t j, int64_t count) {
    V acc[P], v[P];
    IO::load(ip[0] + j, count, acc);
    for (int i = 1; i < NIN; ++i) {
      IO::load(ip[i] + j, count, v);
      for (int p = 0; p < P; ++p) acc[p] = acc[p] + v[p];
    }
    for (int o = 0; o < NOUT; ++o) {
      if (o > 0)
        for (int p = 0; p < P; ++p) acc[p] = acc[p] + acc[p];
      IO::store(op[o] + j, count, acc);
    }
  });
}

// A plain vector copy of n elements (no conversion): the bytes' ceiling at the same vector width.
template <typename T>
void copy_pass(const T* src, T* dst, int64_t n) {
  using Raw = at::vec::Vectorized<T>;
  int64_t j = 0;
  for (; j + Raw::size() <= n; j += Raw::size()) Raw::loadu(src + j).store(dst + j);
  if (j < n) Raw::loadu(src + j, n - j).store(dst + j, n - j);
}

template <typename T>
void convert_dispatch(const std::vector<const T*>& in, const std::vector<T*>& out, int64_t n) {
  const int nin = static_cast<int>(in.size()), nout = static_cast<int>(out.size());
#define TDIFF_CASE(I, O) if (nin == I && nout == O) return convert_pass<T, I, O>(in, out, n);
  TDIFF_CASE(1, 1) TDIFF_CASE(2, 1) TDIFF_CASE(2, 2) TDIFF_CASE(3, 1) TDIFF_CASE(5, 1)
#undef TDIFF_CASE
  TORCH_CHECK(false, "no convert pass with ", nin, " inputs and ", nout, " outputs");
}

// The op's own span loops (csrc/loops, compiled here with the same flags) over per-sample spans, as the op runs
// them, without its validation, allocation and per-sample coefficients: noisy_sample for 2 inputs (1 output: x_t,
// 2: with the network input), else multistep_update with K = inputs - 1.
template <typename T>
void loop_pass(const std::vector<const T*>& in, const std::vector<T*>& out, int64_t n, int64_t batch) {
  using acc_t = at::opmath_type<T>;
  const int64_t per = n / batch;
  const int nin = static_cast<int>(in.size());
  acc_t c[::tdiff::kMaxHistory + 1] = {acc_t(0.9), acc_t(0.3), acc_t(-0.2), acc_t(0.1), acc_t(0.05)};
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t lo = b * per;
    if (nin == 2) {
      ::tdiff::NoisySampleSpan<T> a{};
      a.x0 = in[0] + lo;
      a.eps = in[1] + lo;
      a.xt = out[0] + lo;
      a.net_in = out.size() > 1 ? out[1] + lo : nullptr;
      a.a = acc_t(0.8);
      a.s = acc_t(0.6);
      a.c = acc_t(0.7);
      a.n = per;
      noisy_sample<T>(a);
    } else {
      ::tdiff::MultistepSpan<T> a{};
      a.x = in[0] + lo;
      for (int k = 1; k < nin; ++k) a.h[k - 1] = in[k] + lo;
      a.out = out[0] + lo;
      a.c = c;
      a.k = nin - 1;
      a.n = per;
      multistep<T>(a);
    }
  }
}

// Seconds per pass over `reps` passes: kind 0 convert-only (inputs -> outputs), 1 vector copy (inputs[0] ->
// outputs[0]), 2 the op's span loops (loop_pass).
double time_pass(int64_t kind, std::vector<at::Tensor> inputs, std::vector<at::Tensor> outputs, int64_t reps) {
  const int64_t n = inputs[0].numel();
  double t0 = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, inputs[0].scalar_type(), "time_pass", [&] {
    std::vector<const scalar_t*> in;
    std::vector<scalar_t*> out;
    for (auto& t : inputs) in.push_back(t.data_ptr<scalar_t>());
    for (auto& t : outputs) out.push_back(t.data_ptr<scalar_t>());
    t0 = now();
    for (int64_t r = 0; r < reps; ++r) {
      if (kind == 0)
        convert_dispatch<scalar_t>(in, out, n);
      else if (kind == 1)
        copy_pass<scalar_t>(in[0], out[0], n);
      else
        loop_pass<scalar_t>(in, out, n, inputs[0].size(0));
    }
  });
  return (now() - t0) / reps;
}

// Seconds per call of the fused C++ kernel in a C++ loop (the dispatcher's fixed cost, no Python): kind 0
// tdiff::noisy_sample_cpu (x0, eps at times `coeffs` of the schedule sched_kind/params; write_input), kind 1
// tdiff::multistep_update_out_cpu (x, history -> out).
double time_op(int64_t kind, std::vector<at::Tensor> t, at::Tensor coeffs, bool write_input, int64_t reps,
               int64_t sched_kind, std::vector<double> params) {
  auto& d = c10::Dispatcher::singleton();
  std::optional<at::Tensor> none;
  double t0 = now();
  if (kind == 0) {
    auto op = d.findSchemaOrThrow("tdiff::noisy_sample_cpu", "").typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, at::ArrayRef<double>,
        const std::optional<at::Tensor>&, double, at::ArrayRef<double>, int64_t, bool)>();
    std::vector<double> fdm;
    t0 = now();
    for (int64_t r = 0; r < reps; ++r) op.call(t[0], t[1], coeffs, sched_kind, params, none, 1.0, fdm, 0, write_input);
  } else {
    auto op = d.findSchemaOrThrow("tdiff::multistep_update_out_cpu", "").typed<void(
        const at::Tensor&, at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&,
        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
        at::Tensor, const std::optional<at::Tensor>&)>();
    at::Tensor out = t.back();
    std::vector<at::Tensor> hist(t.begin() + 1, t.end() - 1);
    t0 = now();
    for (int64_t r = 0; r < reps; ++r) op.call(t[0], hist, coeffs, none, none, none, none, out, none);
  }
  return (now() - t0) / reps;
}
// float -> bfloat16 of x (contiguous float, a multiple of 32 elements) through the library's full-step stores:
// mode 0 IoAnyOrder<BFloat16>::store (its even/odd lane order: the float elements are dealt into it first), 1
// Io<BFloat16>::store, 2 the bare hardware narrowing without the subnormal / NaN check (AVX512_BF16 builds only).
at::Tensor narrow_bf16(at::Tensor x, int64_t mode) {
  using V = at::vec::Vectorized<float>;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() % 32 == 0, "narrow_bf16: x");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const float* src = x.data_ptr<float>();
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  const int64_t n = x.numel();
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
#endif
  for (int64_t j = 0; j < n; j += 32) {
    V v[2] = {V::loadu(src + j), V::loadu(src + j + 16)};
    if (mode == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      V d[2] = {_mm512_permutex2var_ps(v[0], even, v[1]), _mm512_permutex2var_ps(v[0], odd, v[1])};
      IoAnyOrder<c10::BFloat16>::store(dst + j, 32, d);
#else
      TORCH_CHECK(false, "narrow_bf16: mode 0 needs AVX512");
#endif
    } else if (mode == 1) {
      Io<c10::BFloat16>::store(dst + j, 32, v);
    } else {
#if defined(__AVX512BF16__)
      _mm512_storeu_si512(dst + j, half_io::bf16_narrow(v[0], v[1]));
#else
      TORCH_CHECK(false, "narrow_bf16: mode 2 needs AVX512_BF16");
#endif
    }
  }
  return out;
}
}  // namespace harness

double time_pass(int64_t kind, std::vector<at::Tensor> inputs, std::vector<at::Tensor> outputs, int64_t reps) {
  return harness::time_pass(kind, inputs, outputs, reps);
}
bool bf16_native() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}
at::Tensor narrow_bf16(at::Tensor x, int64_t mode) {
  return harness::narrow_bf16(x, mode);
}
double time_op(int64_t kind, std::vector<at::Tensor> t, at::Tensor coeffs, bool write_input, int64_t reps,
               int64_t sched_kind, std::vector<double> params) {
  return harness::time_op(kind, t, coeffs, write_input, reps, sched_kind, params);
}
"""


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has AVX512_BF16: the library's AVX512 bfloat16 kernels then narrow in hardware (where its
    build's compiler knew -mavx512bf16, as the harness's does)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in f)
    except OSError:
        return False


def build(isa: str, bf16_native=None, root: str = ROOT, tag: str = ""):
    """The harness module for this instruction set, with the hardware bfloat16 narrowing where the library uses it
    (bf16_native None: this CPU has it), from the headers under root/csrc (load_inline caches the build by source
    and flags)."""
    from torch.utils.cpp_extension import load_inline

    import tdiff._C  # noqa: F401  (registers the tdiff ops the harness calls through the dispatcher)

    native = isa == "AVX512" and (cpu_has_avx512_bf16() if bf16_native is None else bf16_native)
    flags = ["-O3", "-std=c++17", "-fno-math-errno", f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}",
             "-Wno-uninitialized", "-Wno-maybe-uninitialized", "-Wno-unknown-pragmas", *ISA_FLAGS[isa],
             *(["-mavx512bf16"] if native else [])]
    name = f"tdiff_half_ceiling_{isa.lower()}{'_bf16' if native else ''}{tag}"
    return load_inline(name, cpp_sources=[SOURCE], functions=["time_pass", "time_op", "bf16_native", "narrow_bf16"],
                       extra_cflags=flags, extra_include_paths=[os.path.join(root, "csrc")], verbose=False)


def check_bf16_narrowing(mod, quick: bool = False) -> dict:
    """The library's full-step bfloat16 stores against torch's own float -> bfloat16 conversion, bit for bit, over
    every float bit pattern (2^32; quick: every 4096th chunk of 2^16), and where the bare hardware narrowing differs
    (it must be only subnormal and NaN inputs: the lanes the stores check for)."""
    from tqdm import tqdm

    chunk = 1 << 16 if quick else 1 << 25
    starts = range(-(1 << 31), 1 << 31, chunk * (4096 if quick else 1))
    modes = {"IoAnyOrder": 0, "Io": 1}
    mismatches = {k: 0 for k in modes}
    hw_diff = hw_diff_outside = 0
    tiny = torch.finfo(torch.float32).tiny
    for lo in tqdm(starts, desc="bf16 narrowing, all float bit patterns", disable=quick):
        x = torch.arange(lo, lo + chunk, dtype=torch.int32).view(torch.float32)
        want = x.to(torch.bfloat16).view(torch.int16)
        for k, m in modes.items():
            mismatches[k] += int((mod.narrow_bf16(x, m).view(torch.int16) != want).sum())
        if mod.bf16_native():
            diff = mod.narrow_bf16(x, 2).view(torch.int16) != want
            checked = torch.isnan(x) | ((x.abs() < tiny) & (x != 0))
            hw_diff += int(diff.sum())
            hw_diff_outside += int((diff & ~checked).sum())
    values = len(starts) * chunk
    if any(mismatches.values()) or hw_diff_outside:
        raise AssertionError(f"bf16 narrowing is not torch's: {mismatches} mismatches, {hw_diff_outside} unchecked")
    print(f"bf16 narrowing: {values} float bit patterns; library stores vs torch: {mismatches} mismatches; bare "
          f"hardware narrowing: {hw_diff} differ, {hw_diff_outside} of them neither subnormal nor NaN"
          + ("" if mod.bf16_native() else " (no hardware narrowing in this build)"))
    return {"values": values, "hardware": bool(mod.bf16_native()), "store_mismatches": mismatches,
            "bare_hardware_differs": hw_diff, "bare_hardware_differs_not_subnormal_or_nan": hw_diff_outside}


# name -> (inputs, outputs, the op measured beside it: (kind, write_input) or None)
STREAMS = {"round trip (1 in, 1 out)": (1, 1, None),
           "noisy_sample x_t (2 in, 1 out)": (2, 1, (0, False)),
           "noisy_sample x_t + input (2 in, 2 out)": (2, 2, (0, True)),
           "multistep_update K=2 (3 in, 1 out)": (3, 1, (1, False)),
           "multistep_update K=4 (5 in, 1 out)": (5, 1, (1, False))}


def measure(mod, shape, rounds: int) -> list:
    from tdiff import schedules as S

    spec = S.VPLinear().kernel_spec()
    sched = (spec.kind, [float(p) for p in spec.params])
    records = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for name, (nin, nout, op) in STREAMS.items():
            ins = [torch.randn(shape).to(dtype) for _ in range(nin)]
            outs = [torch.empty(shape, dtype=dtype) for _ in range(nout)]
            moved = (nin + nout) * ins[0].numel()
            src = torch.randn(moved // 2).to(dtype)
            dst = torch.empty_like(src)
            reps = max(1, int(5e-4 / max(mod.time_pass(1, [src], [dst], 20), 1e-8)))
            fns = {"copy": lambda: mod.time_pass(1, [src], [dst], reps),
                   "convert-only": lambda: mod.time_pass(0, ins, outs, reps)}
            if op is not None:
                fns["loop"] = lambda: mod.time_pass(2, ins, outs, reps)
                kind, write_input = op
                if kind == 0:
                    t = torch.rand(shape[0], dtype=torch.float64) * 0.98 + 0.01
                    fns["op"] = lambda: mod.time_op(0, ins, t, write_input, reps, *sched)
                else:
                    coeffs = torch.randn(shape[0], nin, dtype=torch.float32)
                    fns["op"] = lambda: mod.time_op(1, [*ins, outs[0]], coeffs, False, reps, *sched)
            for fn in fns.values():  # warm-up: caches, the dispatcher's first calls
                fn()
            times = {k: [] for k in fns}
            for _ in range(rounds):
                for k, fn in fns.items():
                    times[k].append(fn())
            rec = {"dtype": str(dtype).replace("torch.", ""), "streams": name, "shape": list(shape),
                   "bytes": moved * ins[0].element_size()}
            for k in fns:
                s = median_ci(times[k])
                rec[f"{k}_us"] = s["median"] * 1e6
            for k in [k for k in fns if k != "copy"]:
                r = median_ci([c / t for c, t in zip(times["copy"], times[k])])
                rec[f"{k}_frac_of_copy"], rec[f"{k}_frac_lo"], rec[f"{k}_frac_hi"] = r["median"], r["lo"], r["hi"]
            for k in [k for k in ("loop", "op") if k in fns]:
                r = median_ci([c / t for c, t in zip(times["convert-only"], times[k])])
                rec[f"{k}_frac_of_convert_only"], rec[f"{k}_frac_of_convert_only_lo"] = r["median"], r["lo"]
                rec[f"{k}_frac_of_convert_only_hi"] = r["hi"]
            records.append(rec)
    return records


def run(quick: bool = False) -> dict:
    from tdiff.ops import dispatch

    isa = torch.ops.tdiff.cpu_capability() if dispatch.cpp_has("cpu_capability") else None
    if isa not in ISA_FLAGS:
        print(f"half_ceiling: the extension runs {isa!r}; the harness is for {sorted(ISA_FLAGS)} only, skipped")
        return {}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    load_before = load_average()
    try:
        t0 = time.perf_counter()
        mod = build(isa)
        built_s = time.perf_counter() - t0
        narrowing = check_bf16_narrowing(mod, quick)
        records = measure(mod, QUICK_SHAPE if quick else SHAPE, 7 if quick else 61)
    finally:
        torch.set_num_threads(threads_before)
    print_table("In-cache ceiling of half precision (one thread, C++ loops): of copy = copy time / time "
                "(median [95% interval])", ["dtype", "streams", "copy us", "convert-only of copy", "loop of copy",
                                            "op of copy", "loop of convert-only", "op of convert-only"],
                [[r["dtype"], r["streams"], r["copy_us"],
                  f"{r['convert-only_frac_of_copy']:.2f} [{r['convert-only_frac_lo']:.2f}, "
                  f"{r['convert-only_frac_hi']:.2f}]",
                  *[f"{r[k + '_frac_of_copy']:.2f} [{r[k + '_frac_lo']:.2f}, {r[k + '_frac_hi']:.2f}]"
                    if k + "_us" in r else "" for k in ("loop", "op")],
                  *[f"{r[k + '_frac_of_convert_only']:.2f}" if k + "_us" in r else "" for k in ("loop", "op")]]
                 for r in records])
    payload = {"threads": 1, "cpu_capability": isa, "bf16_hardware_narrowing": bool(mod.bf16_native()),
               "bf16_narrowing_check": narrowing, "build_seconds": built_s, "records": records,
               "loadavg_before": load_before, "loadavg_after": load_average()}
    path = write_result("half_ceiling", payload, quick)
    print(f"load average {load_before} -> {payload['loadavg_after']}; wrote {path}")
    return payload


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
