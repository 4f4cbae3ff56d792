"""Rematerialised backprop: the same gradients as plain autograd, without keeping network activations."""
import pytest
import torch

from tdiff.schedules import VPLinear
from tdiff.solvers import sample
from tdiff.timesteps import sample_remat


class TinyMLP(torch.nn.Module):
    """D(x, t): a small network, so the test is about the bookkeeping, not the model."""

    def __init__(self, dim=3, hidden=48):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, dim)).double()
        self.schedule = VPLinear()
        self.hidden = hidden
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return self.net(torch.cat([x, t[:, None]], 1))


@pytest.mark.parametrize("solver,order", [("unipc", 3), ("dpmpp", 3), ("ipndm", 4), ("euler", 1)])
def test_remat_gradients_equal_plain_autograd(solver, order):
    torch.manual_seed(0)
    model = TinyMLP()
    ts = torch.tensor([1.0, 0.7, 0.45, 0.25, 0.1, 0.02, 1e-3], dtype=torch.float64)
    results = []
    for run in (sample, sample_remat):
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        t = ts.clone().requires_grad_()
        tc = (ts - 0.01).clamp_min(5e-4).requires_grad_()
        y = run(model, x, t, solver=solver, order=order, timesteps_cond=tc)
        (y.sin() * torch.arange(3, dtype=torch.float64)).sum().backward()
        results.append((y.detach(), x.grad, t.grad, tc.grad))
    for plain, remat in zip(*results):
        torch.testing.assert_close(remat, plain, rtol=1e-6, atol=1e-6)


def _saved_bytes(run, nfe):
    """Bytes of the tensors autograd keeps for the backward pass of one solve, and the widest saved tensor."""
    model = TinyMLP(hidden=512)
    saved = []

    def pack(t):
        saved.append((t.numel() * t.element_size(), t.shape[-1] if t.dim() else 0))
        return t

    x = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(1.0, 1e-3, nfe + 1, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = run(model, x, t, solver="unipc", order=2)
    y.sum().backward()
    return sum(b for b, _ in saved), max(w for _, w in saved)


def test_remat_keeps_no_network_activations():
    plain4, plain_width = _saved_bytes(sample, 4)
    plain12, _ = _saved_bytes(sample, 12)
    remat4, remat_width = _saved_bytes(sample_remat, 4)
    remat12, _ = _saved_bytes(sample_remat, 12)
    assert plain_width == 512 and remat_width < 512  # hidden activations are never saved
    assert plain12 > 2.5 * plain4  # plain autograd grows with NFE ...
    assert remat12 < 0.25 * plain12 and remat4 < 0.5 * plain4  # ... through the activations remat does not keep


def test_remat_without_grad_is_the_plain_solve():
    model = TinyMLP()
    x = torch.randn(4, 3, dtype=torch.float64)
    ts = torch.linspace(1.0, 1e-3, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sample_remat(model, x, ts, solver="dpmpp", order=2),
                                   sample(model, x, ts, solver="dpmpp", order=2))


class DropoutMLP(TinyMLP):
    """A train-mode network that draws random numbers in every call (like DiT's label dropout)."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.3)
        self.train()

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return self.net(self.drop(torch.cat([x, t[:, None]], 1)))


def test_remat_replays_the_rng_state_of_each_call():
    """The recomputation draws the dropout masks the forward pass drew (torch.utils.checkpoint's
    preserve_rng_state), so the gradients are autograd's; the caller's RNG stream is left where the forward left
    it."""
    model = DropoutMLP()
    ts = torch.tensor([1.0, 0.6, 0.3, 0.1, 1e-3], dtype=torch.float64)
    results = []
    for run in (sample, sample_remat):
        torch.manual_seed(5)
        x = torch.randn(4, 3, dtype=torch.float64).requires_grad_()
        t = ts.clone().requires_grad_()
        y = run(model, x, t, solver="unipc", order=2)
        (y.sin()).sum().backward()
        results.append((y.detach(), x.grad, t.grad, torch.rand(3)))
    for plain, remat in zip(*results):
        torch.testing.assert_close(remat, plain, rtol=1e-10, atol=1e-12)


def test_remat_timestep_gradient_through_a_train_mode_dit_with_label_dropout():
    """The case that was off by 12.6%: a DiT in train mode drops labels at random in every call. In float64: the
    two graphs sum the gradient of a sample that is read twice (by the network and by the next update) in different
    orders, which moves this cancelling float32 gradient by about 1e-5 of itself (the float64 paths agree to 1e-16)."""
    import tdiff
    from tdiff.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2, class_dropout_prob=0.5))
    with torch.no_grad():  # DiT zero-initialises its gates and output layer: make the label reach the output
        for layer in [blk.adaLN_modulation[-1] for blk in net.blocks] + [net.final_layer.adaLN_modulation[-1],
                                                                          net.final_layer.linear]:
            torch.nn.init.normal_(layer.weight, std=0.2)
    net.train().requires_grad_(False).double()
    inner = tdiff.denoiser(net, VPLinear())
    labels = torch.arange(6) % 10

    def model(x, t):
        return inner(x, t, y=labels[: x.shape[0]])

    model.schedule = inner.schedule
    grads = []
    for run in (sample, sample_remat):
        torch.manual_seed(3)
        x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
        t = torch.linspace(1.0, 1e-3, 5, dtype=torch.float64).requires_grad_()
        run(model, x, t, solver="unipc", order=2).square().sum().backward()
        grads.append(t.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=0)


def test_remat_through_a_raw_denoiser_converts_at_the_grid_point_like_plain_sampling():
    """A tdiff Denoiser of an eps network with decoupled network times: the rematerialised solve is the same
    function as the plain one (the conversion happens at the sample's grid point in both), value and gradients."""
    import tdiff

    torch.manual_seed(0)
    net = TinyMLP()
    den = tdiff.denoiser(lambda x, t, y=None: net(x, t / 1000.0), VPLinear(), prediction="eps",
                         model_time=lambda t: 1000.0 * t)
    ts = torch.tensor([1.0, 0.6, 0.3, 0.1, 1e-3], dtype=torch.float64)
    results = []
    for run in (sample, sample_remat):
        x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        t = ts.clone().requires_grad_()
        tc = (ts * 0.97).requires_grad_()  # network times away from the grid: the two conversions would differ
        y = run(den, x, t, solver="unipc", order=2, timesteps_cond=tc)
        (y.cos() * torch.arange(3, dtype=torch.float64)).sum().backward()
        results.append((y.detach(), x.grad, t.grad, tc.grad))
    for plain, remat in zip(*results):
        torch.testing.assert_close(remat, plain, rtol=1e-9, atol=1e-9)
