"""LD3 checkpoints: written atomically every epoch and on SIGTERM; a killed run resumes bit-identically; a
checkpoint of another run is refused, never overwritten."""
import os
import signal

import pytest
import torch
import torch.multiprocessing as mp

from tdiff.artefacts import load_torch
from tdiff.data import GaussianMixture, default_mixture_2d
from tdiff.schedules import DiscreteVP
from tdiff.timesteps import ld3_learn
from tdiff.timesteps.ld3 import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

DDPM = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
RUN = dict(solver="unipc", order=2, nfe=3, teacher_nfe=8, shape=(2,), n_train=8, n_val=4, epochs=3,
           phase1_epochs=1, r_gamma=0.5, dtype=torch.float64, progress=False)


class Counting:
    """The exact mixture denoiser, counting its calls; `action(calls)` runs before each call."""

    def __init__(self, action=None):
        self.den, self.calls, self.action = default_mixture_2d().denoiser(DDPM), 0, action
        self.schedule = DDPM

    def __call__(self, x, t):
        self.calls += 1
        if self.action is not None:
            self.action(self.calls)
        return self.den(x, t)


@pytest.fixture(scope="module")
def reference():
    """An uninterrupted run without a checkpoint, and how many model calls it made."""
    torch.set_num_threads(1)
    den = Counting()
    return ld3_learn(den, **RUN), den.calls


def _same(a, b):
    torch.testing.assert_close(a.timesteps, b.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(a.timesteps_cond, b.timesteps_cond, rtol=0, atol=0)
    for key in ("val_history", "best_val_loss", "x_step_over_radius_median", "iterations", "lr_final", "returned"):
        assert a.metadata[key] == b.metadata[key], key


class _Terminated(Exception):
    pass


def test_sigterm_checkpoints_mid_epoch_and_the_resumed_run_is_bit_identical(reference, tmp_path):
    ref, total = reference
    ckpt = str(tmp_path / "ld3.ckpt")

    def terminate(calls):
        if calls == int(0.55 * total):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_sigterm(signum, frame):  # stands in for the default action (ending the process)
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with pytest.raises(_Terminated):
            ld3_learn(Counting(terminate), **RUN, checkpoint=ckpt)
        assert signal.getsignal(signal.SIGTERM) is on_sigterm  # ld3_learn put the caller's handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    state = load_torch(ckpt, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)["state"]
    assert 0 < state["it"] < ref.metadata["iterations"] and state["pos"] > 0 and not state["done"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # the atomic write left nothing behind
    _same(ld3_learn(Counting(), **RUN, checkpoint=ckpt), ref)


def _killed_run(ckpt: str, at_call: int) -> None:
    """In a forked child: the run SIGKILLs itself at a given model call (no handler can catch that)."""
    torch.set_num_threads(1)
    ld3_learn(Counting(lambda calls: calls == at_call and os.kill(os.getpid(), signal.SIGKILL)), **RUN,
              checkpoint=ckpt)
    os._exit(0)


def test_a_killed_run_resumes_from_its_last_epoch_checkpoint_bit_identically(reference, tmp_path):
    ref, total = reference
    ckpt = str(tmp_path / "ld3.ckpt")
    child = mp.get_context("fork").Process(target=_killed_run, args=(ckpt, int(0.8 * total)))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    state = load_torch(ckpt, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)["state"]
    assert state["epoch"] >= 1 and state["pos"] == 0 and not state["done"]
    _same(ld3_learn(Counting(), **RUN, checkpoint=ckpt), ref)


def test_a_finished_checkpoint_returns_its_result_and_another_run_is_refused(reference, tmp_path):
    ref, _ = reference
    ckpt = tmp_path / "ld3.ckpt"
    _same(ld3_learn(Counting(), **RUN, checkpoint=str(ckpt)), ref)
    before = ckpt.read_bytes()
    again = Counting()
    _same(ld3_learn(again, **RUN, checkpoint=str(ckpt)), ref)
    assert again.calls <= 3 * RUN["nfe"]  # the model probe and the final validation only: nothing retrained
    with pytest.raises(ValueError, match=r"another LD3 run \(it differs in \['seed'\]\)"):
        ld3_learn(Counting(), **dict(RUN, seed=1), checkpoint=str(ckpt))
    other = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), torch.tensor([0.1, 0.2])).denoiser(DDPM)
    with pytest.raises(ValueError, match="model_probe"):  # an analytic denoiser has no weights to fingerprint
        ld3_learn(other, **RUN, checkpoint=str(ckpt))
    assert ckpt.read_bytes() == before
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="ld3.ckpt"):
        ld3_learn(Counting(), **RUN, checkpoint=str(ckpt))
