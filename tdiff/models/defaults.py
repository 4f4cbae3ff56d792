"""Embedded default models: a small DiT and a small UNet trained on digits (16x16). Their weights ship inside the
package (tdiff/weights/default_{dit,unet}.safetensors); `load_default(which)` loads them and never trains.

The recipe (`python -m tdiff train-defaults`): DEFAULT_ITERS (3000) iterations of batch 64, AdamW with warm-up and
cosine decay, EMA weights, seed 0, one thread, no wall-time budget (tdiff.models.trainer). It takes about 20
minutes per model on one idle core. It is deterministic: run twice on one kind of CPU it gives the same weights bit
for bit (train-defaults reports whether a retrain matched the shipped files); on another CPU the float rounding
differs and the Fréchet distance agrees within training noise.

Provenance of the shipped files: they are exactly what `train-defaults` wrote with this recipe (their
`trained_sha256` records the float32 weights, so a retrain can be checked bit for bit).
They are stored in float16: that moved their FD by under 0.1% (both are recorded; HALF_FD_RTOL is the bound).

Each file records its config, schedule, recipe and metrics: the FD of 256 class-conditional samples (20-step
DDIM) of the trained float32 weights (`fd_trained`) and of the stored ones (`fd`), and a cheap FD check (FD_CHECK)
that tests recompute.

Other configs or recipes (`load_default(which, config=..., iters=..., train_if_missing=True)`) train on this
machine into the cache dir, one file per config and recipe, so they never overwrite each other or the defaults.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from typing import Optional, Tuple, Union

import torch

from ..artefacts import hash_state, load_safetensors, require
from ..schedules import DiscreteVP
from .dit import DiT, DiTConfig
from .paths import cache_dir
from .unet import UNet, UNetConfig
from .weights import load_weights, save_weights, seeded, shipped_path

FORMAT, VERSION = "tdiff-default-weights", 1
WHICH = ("dit", "unet")
DEFAULT_ITERS = 3000
DEFAULT_SEED = 0
RECIPE_THREADS = 1
_TRAIN = {"dit": dict(lr=1.5e-3, batch_size=64), "unet": dict(lr=2e-3, batch_size=64)}
FD_CHECK = dict(n=100, steps=10, seed=1, clip_x0=1.0)
PROBE_ITERS = 3
HALF_FD_RTOL = 0.01  # shipped weights are stored in float16 only if that moves their FD by less than 1%


def default_schedule() -> DiscreteVP:
    """DDPM's linear betas, 1e-4 to 0.02 over 1000 steps."""
    return DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def default_config(which: str) -> Union[DiTConfig, UNetConfig]:
    _check_which(which)
    return DiTConfig.preset("digits") if which == "dit" else UNetConfig.preset("digits")


def config_of(which: str, config: Union[None, dict, DiTConfig, UNetConfig] = None) -> Union[DiTConfig, UNetConfig]:
    """The network config for `which`: the default one, or `config` (a config object or a dict) validated."""
    _check_which(which)
    cfg_cls = DiTConfig if which == "dit" else UNetConfig
    if config is None:
        return default_config(which)
    if isinstance(config, dict):
        return cfg_cls(**config)
    if not isinstance(config, cfg_cls):
        raise ValueError(f"config for {which!r} must be a {cfg_cls.__name__} or dict, got {type(config).__name__}")
    return config


def build_model(which: str, config: Union[None, dict, DiTConfig, UNetConfig] = None) -> torch.nn.Module:
    return (DiT if which == "dit" else UNet)(config_of(which, config))


def _check_which(which):
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")


def _recipe(which: str, config, iters: Optional[int], time_budget_s: Optional[float], seed: int) -> dict:
    """Everything that determines a trained default, as stored in its file and hashed into its cache name."""
    if iters is not None and (not isinstance(iters, int) or iters <= 0):
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValueError(f"time_budget_s must be positive seconds or None, got {time_budget_s!r}")
    return {"which": which, "config": config.to_dict(), "iters": DEFAULT_ITERS if iters is None else iters,
            "time_budget_s": time_budget_s, "seed": seed, **_TRAIN[which], "warmup": 100, "ema_decay": 0.999}


def _is_shipped_recipe(recipe: dict) -> bool:
    which = recipe["which"]
    return recipe == _recipe(which, default_config(which), None, None, DEFAULT_SEED)


def shipped_default_path(which: str) -> str:
    _check_which(which)
    return shipped_path(f"default_{which}")


def checkpoint_path(which: str, config=None, iters: Optional[int] = None, time_budget_s: Optional[float] = None,
                    seed: int = DEFAULT_SEED) -> str:
    """Where a default trained on this machine is cached: one file per config and recipe (cache_dir())."""
    _check_which(which)
    recipe = _recipe(which, config_of(which, config), iters, time_budget_s, seed)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), f"default_{which}-{key}.safetensors")


def _make_denoiser(model, schedule, guidance=None, clip_x0=None):
    from ..denoisers import denoiser

    return denoiser(model, schedule, prediction="eps", guidance=guidance, null_label=model.null_label,
                    clip_x0=clip_x0)


def _load(path: str, which: str, recipe: Optional[dict], schedule: DiscreteVP) -> Tuple[torch.nn.Module, dict]:
    def check(doc):
        require(doc, path, FORMAT, which=str, config=dict, schedule=dict, recipe=dict, metrics=dict)
        if doc["which"] != which:
            raise ValueError(f"{path!r} holds a {doc['which']!r} model, expected {which!r}")
        if recipe is not None and doc["recipe"] != recipe:
            raise ValueError(f"{path!r} was trained with {doc['recipe']}, not the requested {recipe}")
        if doc["schedule"] != schedule.config():
            raise ValueError(f"{path!r} was trained with schedule {doc['schedule']}, not {schedule.config()}")

    return load_weights(path, FORMAT, VERSION, lambda doc: build_model(which, doc["config"]), check)


def load_default(which: str, train_if_missing: bool = False, progress: bool = True, guidance: Optional[float] = None,
                 config=None, iters: Optional[int] = None, time_budget_s: Optional[float] = None,
                 evaluate: bool = True, num_threads: Optional[int] = None, clip_x0: Optional[float] = 1.0):
    """-> (model, schedule, denoiser) for the default 'dit' or 'unet' digits model: the shipped weights.

    `config`, `iters` and `time_budget_s` ask for another model or recipe (tests use tiny configs). Such a model
    is loaded from the cache dir, or trained there when train_if_missing=True (else FileNotFoundError); an
    unusable cached file is retrained with a warning when train_if_missing=True, and an error otherwise. The
    shipped weights are never retrained: a missing or damaged shipped file is an error (reinstall, or pass
    train_if_missing=True to train the recipe into the cache dir). evaluate=False skips the Fréchet distance
    measured after training. The denoiser clamps its x0 prediction to [-clip_x0, clip_x0] (the digits live in
    [-1, 1]; this removes the occasional diverged sample of the small defaults); clip_x0=None gives the raw
    network. The caller's RNG state is left untouched."""
    _check_which(which)
    recipe = _recipe(which, config_of(which, config), iters, time_budget_s, DEFAULT_SEED)
    schedule = default_schedule()
    shipped = shipped_default_path(which)
    if _is_shipped_recipe(recipe) and (os.path.exists(shipped) or not train_if_missing):
        if not os.path.exists(shipped):
            raise FileNotFoundError(
                f"the shipped default {which} weights {shipped!r} are missing (a broken install): reinstall tdiff, "
                f"or pass train_if_missing=True to train them here (about 20 minutes on one core)")
        try:
            model, _ = _load(shipped, which, recipe, schedule)
        except ValueError as e:
            raise ValueError(f"the shipped default {which} weights are unusable: {e}; reinstall tdiff") from e
        return model, schedule, _make_denoiser(model, schedule, guidance, clip_x0)
    path = checkpoint_path(which, config, iters, time_budget_s)
    if os.path.exists(path):
        try:
            model, _ = _load(path, which, recipe, schedule)
            return model, schedule, _make_denoiser(model, schedule, guidance, clip_x0)
        except ValueError as e:
            if not train_if_missing:
                raise
            warnings.warn(f"default {which} checkpoint {path!r} is unusable ({e}); retraining it", RuntimeWarning)
    elif not train_if_missing:
        raise FileNotFoundError(f"no {which} checkpoint for config {recipe['config']} and iters={recipe['iters']} "
                                f"at {path!r}; pass train_if_missing=True to train it")
    model, _ = train_default(which, config=config, iters=iters, time_budget_s=time_budget_s, progress=progress,
                             evaluate=evaluate, num_threads=num_threads, path=path)
    return model, schedule, _make_denoiser(model, schedule, guidance, clip_x0)


def evaluate_fd(model, schedule, n: int = 256, steps: int = 20, seed: int = 0,
                clip_x0: Optional[float] = None) -> float:
    """Fréchet distance of n class-conditional samples (labels 0..9 in turn), `steps`-step DDIM, one thread."""
    from ..metrics.frechet import frechet_distance
    from .trainer import ddim_sample

    cfg = model.config
    y = torch.arange(n) % 10 if getattr(model, "num_classes", 0) else None
    shape = (n, cfg.in_channels, cfg.input_size, cfg.input_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded figures do not depend on the machine's core count
    try:
        x = ddim_sample(_make_denoiser(model, schedule, clip_x0=clip_x0), shape, steps, y=y, seed=seed)
    finally:
        torch.set_num_threads(threads)
    return frechet_distance(x, size=cfg.input_size)


def fd_check(model, schedule) -> float:
    """The cheap FD recorded in each file (FD_CHECK: 100 samples, 10 DDIM steps) that tests recompute."""
    return evaluate_fd(model, schedule, **FD_CHECK)


def probe(initial: dict, state: dict) -> list:
    """A summary of how a run moved the weights, robust to float rounding and sensitive to anything else: per
    tensor (in name order), [<delta, r>, |delta|] with delta = state - initial and r a fixed standard-normal
    vector. Two runs of one recipe agree to ~1e-6 relative on any CPU; a change of data, seed, learning rate or
    dropout draws moves them by far more."""
    rows = []
    for i, name in enumerate(sorted(initial)):
        d = (state[name].detach().double() - initial[name].detach().double()).reshape(-1)
        r = torch.randn(d.numel(), generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        rows.append([float(d @ r), float(d.norm())])
    return rows


def probes_agree(a: list, b: list, rtol: float = 1e-3) -> bool:
    if len(a) != len(b):
        return False
    return all(abs(da - db) <= rtol * nb + 1e-12 and abs(na - nb) <= rtol * nb + 1e-12
               for (da, na), (db, nb) in zip(a, b))


def train_default(which: str, config=None, iters: Optional[int] = None, time_budget_s: Optional[float] = None,
                  progress: bool = True, seed: int = DEFAULT_SEED, evaluate: bool = True,
                  num_threads: Optional[int] = None, path: Optional[str] = None, half: bool = False,
                  stop_after: Optional[int] = None) -> Tuple[torch.nn.Module, dict]:
    """Train one default from scratch with the recipe (see the module doc) and save it to `path` (default:
    checkpoint_path(...) in the cache dir), in float16 when `half` and the float16 weights' FD is within
    HALF_FD_RTOL of the float32 ones' (else in float32; both FDs are recorded). Returns (EMA model, metrics).
    stop_after: stop after that many iterations and save nothing (to replay a prefix of the run)."""
    from ..data.digits import load_digits_tensor
    from .trainer import train_diffusion

    _check_which(which)
    config = config_of(which, config)
    recipe = _recipe(which, config, iters, time_budget_s, seed)
    schedule = default_schedule()
    if config.input_size not in (8, 16, 32) or config.in_channels != 1:
        raise ValueError(f"digits defaults need in_channels=1 and input_size 8, 16 or 32, got {config}")
    images, labels = load_digits_tensor(config.input_size)
    with seeded(seed):
        model = build_model(which, config)
        untrained = build_model(which, config).eval()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    probed = {}

    def on_step(k, m):
        if k == PROBE_ITERS:
            probed["probe"] = probe(initial, m.state_dict())

    ema, info = train_diffusion(
        model, schedule, images, labels if config.num_classes else None, iters=recipe["iters"],
        batch_size=recipe["batch_size"], lr=recipe["lr"], warmup=recipe["warmup"], ema_decay=recipe["ema_decay"],
        seed=seed, time_budget_s=time_budget_s, progress=progress, num_threads=num_threads, stop_after=stop_after,
        on_step=on_step)
    metrics = {"iters": info["iters"], "train_wall_time_s": round(info["wall_time_s"], 1),
               "final_loss": info["final_loss"]}
    if stop_after is not None:
        return ema, {**metrics, **probed, "weights_sha256": hash_state(model.state_dict())}
    stored = ema
    if half:
        with seeded(seed):
            stored = build_model(which, config).eval()
        stored.load_state_dict({k: v.half() for k, v in ema.state_dict().items()})
    if evaluate:
        t0 = time.perf_counter()
        metrics["fd_trained"] = evaluate_fd(ema, schedule)
        metrics["fd_trained_clip_x0"] = evaluate_fd(ema, schedule, clip_x0=1.0)
        metrics["fd_untrained"] = evaluate_fd(untrained, schedule)
        metrics["fd_untrained_clip_x0"] = evaluate_fd(untrained, schedule, clip_x0=1.0)
        metrics["fd"], metrics["fd_clip_x0"] = metrics["fd_trained"], metrics["fd_trained_clip_x0"]
        if half:
            fd16 = {"fd": evaluate_fd(stored, schedule), "fd_clip_x0": evaluate_fd(stored, schedule, clip_x0=1.0)}
            metrics["fd_float16"] = fd16
            # float16 only when it keeps the Fréchet distance within HALF_FD_RTOL of the float32 weights'
            half = all(abs(fd16[k] - metrics[k]) <= HALF_FD_RTOL * metrics[k] for k in fd16)
            if half:
                metrics.update(fd16)
            else:
                stored = ema
        metrics["fd_check"] = {**FD_CHECK, "value": fd_check(stored, schedule)}
        metrics["eval_wall_time_s"] = round(time.perf_counter() - t0, 1)
    save_weights(path or checkpoint_path(which, config, iters, time_budget_s, seed), FORMAT, VERSION, ema, {
        "which": which, "config": config.to_dict(), "schedule": schedule.config(), "recipe": recipe,
        "metrics": metrics,
        "probe": {"iters": PROBE_ITERS, "rows": probed.get("probe"), "source": "recorded during this training run"},
        "trained_sha256": hash_state(ema.state_dict()),  # the float32 EMA weights, before any rounding
        "trained_with": {"torch": torch.__version__, "threads": torch.get_num_threads() if num_threads is None
                         else num_threads, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
    }, half=half)
    return ema, metrics


def shipped_metadata(which: str) -> dict:
    """The metadata of the shipped default `which` (recipe, metrics, probe)."""
    return load_safetensors(shipped_default_path(which), FORMAT, VERSION)[0]


def checkpoint_metrics(which: str) -> dict:
    """The metrics recorded in the shipped default (FD trained/stored/untrained, iterations, wall time)."""
    return dict(shipped_metadata(which)["metrics"])


def train_defaults(which="all", out: Optional[str] = None, progress: bool = True) -> dict:
    """`python -m tdiff train-defaults`: run the recipe for 'dit', 'unet' and the metric 'classifier' (or 'all',
    or a list), write the files that ship in tdiff/weights/ to `out` (default ./tdiff_defaults), and report per
    model whether the retrain reproduced the shipped weights bit for bit and its FD next to the shipped one."""
    from ..metrics import frechet

    names = ("classifier",) + WHICH if which == "all" else ((which,) if isinstance(which, str) else tuple(which))
    for name in names:
        if name != "classifier":
            _check_which(name)
    out = os.path.abspath(out or "tdiff_defaults")
    results = {}
    for name in names:
        if name == "classifier":
            path = os.path.join(out, "digits_classifier.safetensors")
            report = {"metadata": frechet.write_classifier(path), "path": path}
            shipped = shipped_path("digits_classifier")
            if os.path.exists(shipped):
                ship = load_safetensors(shipped, frechet.FORMAT, frechet.VERSION)[0]
                report["bit_identical_to_shipped"] = report["metadata"]["trained_sha256"] == ship["trained_sha256"]
            results[name] = report
            print(f"classifier: {report}")
            continue
        path = os.path.join(out, f"default_{name}.safetensors")
        _, metrics = train_default(name, progress=progress, num_threads=RECIPE_THREADS, path=path, half=True)
        doc = load_weights(path, FORMAT, VERSION, lambda d: build_model(name, d["config"]))[1]
        report = {"metrics": metrics, "path": path}
        if os.path.exists(shipped_default_path(name)):
            ship = shipped_metadata(name)
            report["bit_identical_to_shipped"] = doc["trained_sha256"] == ship["trained_sha256"]
            report["shipped_fd_clip_x0"] = ship["metrics"].get("fd_clip_x0")
        results[name] = report
        print(f"{name}: {report}")
    return results
