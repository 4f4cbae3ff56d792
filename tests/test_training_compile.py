"""DiffusionLoss compiles into one graph (torch.compile fullgraph=True) on its documented path: check=False, times
and noise drawn outside. The FDM warm-up cap is a tensor, so it grows without recompiling."""
import contextlib

import torch

from tdiff import schedules as S
from tdiff.training import DiffusionLoss


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x, t):
        return self.lin(x.flatten(1)).view_as(x) * (1.0 + t.view(-1, 1, 1, 1) / 1000.0)


def test_loss_compiles_without_graph_breaks_or_recompiles(one_thread):
    torch._dynamo.reset()
    net = _Net()
    cases = [(S.EDM(), dict(process="fdm", warmup=3)),
             (S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)),
              dict(sampler="speed", weighting="speed"))]
    for sched, kw in cases:
        loss_fn = DiffusionLoss(sched, check=False, **kw)
        step = torch.compile(lambda x0, t, noise: loss_fn(net, x0, t=t, noise=noise), fullgraph=True,
                             backend="aot_eager")
        g = torch.Generator().manual_seed(0)
        for i in range(5):  # past the end of the warm-up: the cap changes every step, then becomes inf
            x0 = torch.randn(4, 1, 4, 4, generator=g)
            t, noise = loss_fn.sample_t(4, "cpu", g), torch.randn(4, 1, 4, 4, generator=g)
            with torch.compiler.set_stance("fail_on_recompile") if i else contextlib.nullcontext():
                compiled = step(x0, t, noise)
            eager = loss_fn(net, x0, t=t, noise=noise)
            torch.testing.assert_close(compiled, eager)
            compiled.backward()
            loss_fn.step()
