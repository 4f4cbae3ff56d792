"""Property-based fuzz of every op (issue 17 item 3): random shapes, strides, dtypes, indices and backends, valid
or one mutation away from valid. Each call must give a clear error (ValueError / TypeError naming what was
expected) or equal the reference; never a crash, an out-of-bounds access or an obscure error. The public functions
and the registered C++ ops (callable directly through torch.ops.tdiff) are both fuzzed.

Bounded for CI: a fixed example count per op (derandomized, so every run draws the same cases), well under 60 s.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdiff import schedules as S
from tdiff.ops import dispatch
from tdiff.ops.cached_block import cached_block, cached_block_backward_reference, cached_block_reference
from tdiff.ops.multistep_update import (multistep_update, multistep_update_backward_reference,
                                        multistep_update_convert_reference, multistep_update_reference)
from tdiff.ops.noisy_sample import noisy_sample, noisy_sample_backward_reference, noisy_sample_reference
from tdiff.ops.weighted_mse import weighted_mse_backward_reference, weighted_mse_reference, weighted_mse_with_mse

assert dispatch.extension_loaded()  # the registered C++ ops are fuzzed directly too (CI builds the extension)
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CLEAR = (ValueError, TypeError)
DTYPES = st.sampled_from(FLOATS * 3 + [torch.int64])  # mostly valid, sometimes not
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
BACKENDS = st.sampled_from(["torch", "cpp", "cpp", "triton"])  # cpp twice: the direct fast path is the common one
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10),
       torch.bfloat16: dict(atol=5e-2, rtol=5e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}


def tol(dtype):
    return TOL.get(dtype, TOL[torch.float32])


@st.composite
def layouts(draw, shape, dtype):
    """A tensor of `shape` and `dtype` in a drawn layout: contiguous, permuted, strided, expanded or
    channels_last."""
    kind = draw(st.sampled_from(["contiguous", "permuted", "strided", "expanded", "channels_last"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def rnd(s):
        t = torch.randn(s, generator=gen, dtype=torch.float64)
        return (t * 3).round().to(dtype) if not dtype.is_floating_point else t.to(dtype)

    if kind == "permuted" and len(shape) >= 2:
        return rnd(shape[::-1]).permute(*range(len(shape) - 1, -1, -1))
    if kind == "strided" and len(shape) >= 1:
        return rnd((*shape[:-1], 2 * shape[-1]))[..., ::2]
    if kind == "expanded" and len(shape) >= 2:
        return rnd((*shape[:-1], 1)).expand(shape)
    if kind == "channels_last" and len(shape) == 4:
        return rnd(shape).to(memory_format=torch.channels_last)
    return rnd(shape)


def sample_shapes():
    return st.tuples(st.integers(1, 3), st.lists(st.integers(0, 4), min_size=0, max_size=3)).map(
        lambda bt: (bt[0], *bt[1]))


def outcome(fn, direct=False):
    """(result, None) or (None, the clear error). Anything else propagates and fails the test. A registered op
    called directly (`direct`) may also stop at the dispatcher's own argument parser, whose RuntimeError names the
    argument and the type it expected."""
    try:
        return fn(), None
    except CLEAR as e:
        assert str(e).strip(), "an error without a message"
        return None, e
    except RuntimeError as e:
        if direct and "Expected a value of type" in str(e):
            return None, e
        raise


def wrong_dtype(draw, dtype):
    return draw(st.sampled_from([d for d in FLOATS + [torch.int64] if d != dtype]))


# ---------------------------------------------------------------------------------------------------------------
# multistep_update
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def multistep_cases(draw):
    shape = draw(sample_shapes())
    dtype = draw(DTYPES)
    k = draw(st.sampled_from([1, 2, 3, 4] * 3 + [0, 5]))
    form = draw(st.sampled_from(["plain", "cfg", "convert", "cfg+convert", "convert at x"]))
    acc = dispatch.coef_dtype(torch.empty(0, dtype=dtype)) if dtype.is_floating_point else torch.float32
    x = draw(layouts(shape, dtype))
    hist = [draw(layouts(shape, dtype)) for _ in range(k)]
    shared = draw(st.booleans())
    coeffs = draw(layouts(((1 + k,) if shared else (shape[0], 1 + k)), acc))
    kw = {}
    if "cfg" in form:
        kw["uncond"] = draw(layouts(shape, dtype))
        kw["scale"] = draw(st.sampled_from(["tensor", "float", "scalar tensor"]))
        kw["scale"] = {"tensor": torch.rand(shape[0], dtype=acc) * 5, "float": 3.5,
                       "scalar tensor": torch.tensor(2.5, dtype=acc)}[kw["scale"]]
    if "convert" in form:
        kw["convert"] = draw(layouts(((2,) if shared else (shape[0], 2)), acc))
        if form != "convert at x":
            kw["src"] = draw(layouts(shape, dtype))
    mutation = draw(st.sampled_from(["none"] * 10 + ["hist shape", "hist dtype", "hist none", "coeffs shape",
                                                     "coeffs dtype", "uncond shape", "scale shape", "convert shape",
                                                     "src only"]))
    if mutation == "hist shape" and hist:
        hist[-1] = torch.randn(shape[0], 7)
    elif mutation == "hist dtype" and hist:
        hist[0] = hist[0].to(wrong_dtype(draw, dtype))
    elif mutation == "hist none" and hist:
        hist[0] = None
    elif mutation == "coeffs shape":
        coeffs = torch.randn(shape[0] + 1, 2 + k, dtype=acc)
    elif mutation == "coeffs dtype":
        coeffs = coeffs.to(wrong_dtype(draw, acc))
    elif mutation == "uncond shape" and "uncond" in kw:
        kw["uncond"] = torch.randn(shape[0], 9).to(dtype)
    elif mutation == "scale shape" and "uncond" in kw:
        kw["scale"] = torch.rand(shape[0] + 2, dtype=acc)
    elif mutation == "convert shape" and "convert" in kw:
        kw["convert"] = torch.randn(shape[0], 3, dtype=acc)
    elif mutation == "src only":
        kw = {"src": x}
    return x, hist, coeffs, kw, draw(st.booleans()), draw(BACKENDS)


@FUZZ
@given(case=multistep_cases())
def test_fuzz_multistep_update(case):
    x, hist, coeffs, kw, check, backend = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDIFF_BACKEND", backend)
        got, err = outcome(lambda: multistep_update(x, hist, coeffs, check=check, **kw))
    direct_op = "multistep_update_convert_cpu" if kw else "multistep_update_cpu"
    scale = kw.get("scale")
    direct_kw = dict(kw)
    if isinstance(scale, float):
        direct_kw["scale"] = torch.tensor(scale, dtype=coeffs.dtype)
    direct, direct_err = outcome(lambda: getattr(torch.ops.tdiff, direct_op)(x, hist, coeffs, **direct_kw),
                                 direct=True)
    if err is not None:
        assert direct_err is not None or not torch.isfinite(coeffs).all(), f"only the public path refused: {err}"
        return
    # valid: equal to the reference (rows expanded, scale as a per-sample tensor)
    b = x.shape[0]
    rows = lambda r: r.unsqueeze(0).expand(b, -1) if r.dim() == 1 else r  # noqa: E731
    ref_kw = dict(kw)
    if "scale" in kw:
        s = torch.as_tensor(kw["scale"], dtype=coeffs.dtype)
        ref_kw["scale"] = s.expand(b) if s.dim() == 0 else s
    if "convert" in kw:
        ref_kw["convert"] = rows(kw["convert"])
    if kw:
        want = multistep_update_convert_reference(x, hist, rows(coeffs), **ref_kw)
    else:
        want = (multistep_update_reference(x, hist, rows(coeffs)),)
    got = got if isinstance(got, tuple) else (got,)
    assert direct_err is None, f"the C++ op refused a valid input: {direct_err}"
    direct = direct if isinstance(direct, tuple) else (direct,)
    for g, d, w in zip(got, direct, want):
        torch.testing.assert_close(g, w, **tol(x.dtype), equal_nan=True)
        torch.testing.assert_close(d, w, **tol(x.dtype), equal_nan=True)


@FUZZ
@given(shape=sample_shapes(), dtype=st.sampled_from(FLOATS), k=st.integers(1, 4), backend=BACKENDS,
       bad=st.sampled_from(["none", "grad shape", "coeffs rows", "grad dtype"]))
def test_fuzz_multistep_update_backward(shape, dtype, k, backend, bad):
    acc = dispatch.coef_dtype(torch.empty(0, dtype=dtype))
    x, grad = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    hist = [torch.randn(shape).to(dtype) for _ in range(k)]
    coeffs = torch.randn(shape[0], 1 + k, dtype=acc)
    if bad == "grad shape":
        grad = torch.randn(shape[0], 5).to(dtype)
    elif bad == "coeffs rows":
        coeffs = coeffs[:, :k]
    elif bad == "grad dtype":
        grad = grad.to(torch.float64 if dtype != torch.float64 else torch.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDIFF_BACKEND", backend)
        got, err = outcome(lambda: torch.ops.tdiff.multistep_update_backward(grad, x, hist, coeffs))
    direct, direct_err = outcome(lambda: torch.ops.tdiff.multistep_update_backward_cpu(grad, x, hist, coeffs))
    if bad != "none":
        assert err is not None and direct_err is not None
        return
    want = multistep_update_backward_reference(grad, x, hist, coeffs)
    for res in (got, direct):
        torch.testing.assert_close(res[0], want[0], **tol(dtype))
        for a, w in zip(res[1], want[1]):
            torch.testing.assert_close(a, w, **tol(dtype))
        torch.testing.assert_close(res[2], want[2], atol=1e-2, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# noisy_sample
# ---------------------------------------------------------------------------------------------------------------
SCHEDULES = [S.VPLinear(), S.VPCosine(), S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 100)), S.VE(), S.EDM(),
             S.RectifiedFlow()]


@st.composite
def noisy_sample_cases(draw):
    shape = draw(sample_shapes())
    dtype = draw(DTYPES)
    sched = draw(st.sampled_from(SCHEDULES))
    x0, eps = draw(layouts(shape, dtype)), draw(layouts(shape, dtype))
    lo, hi = sched.domain
    inside = st.floats(lo, min(hi, 100.0))
    outside = st.sampled_from([-1.0, 2.0, math.inf, math.nan])
    t = torch.tensor(draw(st.lists(st.one_of(*[inside] * 8, outside), min_size=shape[0], max_size=shape[0])),
                     dtype=torch.float64)
    mutation = draw(st.sampled_from(["none"] * 6 + ["eps shape", "eps dtype", "t shape", "t int"]))
    if mutation == "eps shape":
        eps = torch.randn(shape[0], 6).to(dtype)
    elif mutation == "eps dtype":
        eps = eps.to(wrong_dtype(draw, dtype))
    elif mutation == "t shape":
        t = torch.rand(shape[0] + 1)
    elif mutation == "t int":
        t = torch.ones(shape[0], dtype=torch.int64)
    precond = draw(st.sampled_from([None, 0.5, 1.0]))
    return x0, eps, t, sched, precond, draw(st.booleans()), draw(BACKENDS)


@FUZZ
@given(case=noisy_sample_cases())
def test_fuzz_noisy_sample(case):
    x0, eps, t, sched, precond, write_input, backend = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDIFF_BACKEND", backend)
        got, err = outcome(lambda: noisy_sample(x0, eps, t, sched, precond_sigma_data=precond,
                                                write_input=write_input))
    if err is not None:
        return
    lo, hi = sched.domain
    assert bool(((t >= lo) & (t <= hi)).all()), f"t={t.tolist()} outside {sched.domain} was accepted"
    spec = sched.kernel_spec()
    table = None if spec.table is None else spec.table.double()
    ref_xt, ref_in, _ = noisy_sample_reference(x0, eps, t, spec.kind, list(spec.params), table,
                                               -1.0 if precond is None else precond, [], 0, write_input)
    torch.testing.assert_close(got[0], ref_xt, **tol(x0.dtype))
    if write_input:
        torch.testing.assert_close(got[1], ref_in, **tol(x0.dtype))


@FUZZ
@given(shape=sample_shapes(), dtype=st.sampled_from(FLOATS), backend=BACKENDS, has_in=st.booleans(),
       bad=st.sampled_from(["none", "short coefs", "grad_in shape", "coefs int"]))
def test_fuzz_noisy_sample_backward(shape, dtype, backend, has_in, bad):
    gxt = torch.randn(shape).to(dtype)
    gin = torch.randn(shape).to(dtype) if has_in else torch.empty(0, dtype=dtype)
    coefs = torch.rand(shape[0], 3, dtype=dispatch.coef_dtype(gxt))
    if bad == "short coefs":  # issue 17: a short coefs made the C++ kernel read out of bounds
        coefs = coefs[:1, :2]
    elif bad == "grad_in shape":
        gin = torch.randn(shape[0], 9).to(dtype)
    elif bad == "coefs int":
        coefs = torch.ones(shape[0], 3, dtype=torch.int64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDIFF_BACKEND", backend)
        got, err = outcome(lambda: torch.ops.tdiff.noisy_sample_backward(gxt, gin, coefs))
    direct, direct_err = outcome(lambda: torch.ops.tdiff.noisy_sample_backward_cpu(gxt, gin, coefs))
    if bad != "none":
        assert direct_err is not None and (err is not None or bad == "coefs int")
        return
    want = noisy_sample_backward_reference(gxt, gin, coefs)
    for res in (got, direct):
        for a, w in zip(res, want):
            torch.testing.assert_close(a, w, **tol(dtype))


# ---------------------------------------------------------------------------------------------------------------
# weighted_mse
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def weighted_mse_cases(draw):
    shape = draw(sample_shapes())
    dtype = draw(DTYPES)
    pred, target = draw(layouts(shape, dtype)), draw(layouts(shape, dtype))
    weight = torch.rand(shape[0], dtype=draw(st.sampled_from([torch.float32, torch.float64])))
    mutation = draw(st.sampled_from(["none"] * 5 + ["target shape", "target dtype", "weight shape", "weight int"]))
    if mutation == "target shape":
        target = torch.randn(shape[0] + 1, *shape[1:]).to(dtype)
    elif mutation == "target dtype":
        target = target.to(wrong_dtype(draw, dtype))
    elif mutation == "weight shape":
        weight = torch.rand(shape[0], 2)
    elif mutation == "weight int":
        weight = torch.ones(shape[0], dtype=torch.int64)
    return pred, target, weight, draw(st.booleans()), draw(BACKENDS)


@FUZZ
@given(case=weighted_mse_cases())
def test_fuzz_weighted_mse(case):
    pred, target, weight, backward, backend = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDIFF_BACKEND", backend)
        got, err = outcome(lambda: weighted_mse_with_mse(pred, target, weight))
        if err is None and backward:
            g = torch.randn(pred.shape[0])
            grad, grad_err = outcome(lambda: torch.ops.tdiff.weighted_mse_backward(g, pred, target, weight))
            assert grad_err is None
            torch.testing.assert_close(grad, weighted_mse_backward_reference(g, pred, target, weight),
                                       **tol(pred.dtype))
    direct, direct_err = outcome(lambda: torch.ops.tdiff.weighted_mse_cpu(pred, target, weight))
    assert (err is None) == (direct_err is None), (err, direct_err)
    if err is None:
        want = weighted_mse_reference(pred, target, weight)
        for res in (got, direct):
            for a, w in zip(res, want):
                torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# cached_block
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def cached_block_cases(draw):
    b, n, c = draw(st.integers(1, 4)), draw(st.integers(0, 3)), draw(st.integers(0, 5))
    dtype = draw(DTYPES)
    computing = draw(st.lists(st.booleans(), min_size=b, max_size=b))
    rows = sum(computing)
    source = torch.full((b,), -1, dtype=torch.int64)
    source[torch.tensor(computing, dtype=torch.bool)] = torch.randperm(rows)
    x, cache = draw(layouts((b, n, c), dtype)), draw(layouts((b, n, c), dtype))
    gate = draw(layouts((b, c), dtype))
    fresh = draw(layouts((rows, n, c), dtype))
    mutation = draw(st.sampled_from(["none"] * 6 + ["index", "index", "duplicate", "short fresh", "gate shape",
                                                    "source int32", "fresh dtype"]))
    if mutation == "index":
        source[draw(st.integers(0, b - 1))] = draw(st.sampled_from([-2, rows, rows + 5, 10**6]))
    elif mutation == "duplicate" and rows >= 2:
        source[source == 1] = 0
    elif mutation == "short fresh" and rows >= 1:
        fresh = fresh[: rows - 1]
    elif mutation == "gate shape":
        gate = torch.randn(b, c + 1).to(dtype)
    elif mutation == "source int32":
        source = source.int()
    elif mutation == "fresh dtype":
        fresh = fresh.to(wrong_dtype(draw, dtype))
    return x, gate, fresh, cache, source, draw(BACKENDS)


@FUZZ
@given(case=cached_block_cases())
def test_fuzz_cached_block(case):
    x, gate, fresh, cache, source, backend = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDIFF_BACKEND", backend)
        got, err = outcome(lambda: cached_block(x, gate, fresh, cache, source))
        back, back_err = None, None
        if err is None and x.shape[1] * x.shape[2]:
            g = torch.randn(x.shape).to(x.dtype)
            back, back_err = outcome(lambda: torch.ops.tdiff.cached_block_backward(
                g, g, gate, got[1], source, fresh.shape[0]))
    direct, direct_err = outcome(lambda: torch.ops.tdiff.cached_block_cpu(x, gate, fresh, cache, source))
    assert (err is None) == (direct_err is None), (err, direct_err)
    if err is not None:
        return
    want = cached_block_reference(x, gate, fresh, cache, source)
    for res in (got, direct):
        torch.testing.assert_close(res[0], want[0], **tol(x.dtype))
        assert torch.equal(res[1], want[1])
    if back is not None:
        assert back_err is None
        want_back = cached_block_backward_reference(g, g, gate, got[1], source, fresh.shape[0])
        for a, w in zip(back, want_back):
            torch.testing.assert_close(a, w, **tol(x.dtype))
