"""LearnedSchedule files: load always validates (every damaged or hostile case gets a clear error naming the file),
and every schedule family round-trips through the file to diffusers."""
import json

import pytest
import torch

from tdiff.schedules import EDM, VE, DiscreteVP, RectifiedFlow, VPCosine, VPLinear
from tdiff.timesteps import LearnedSchedule, logsnr_uniform

DDPM = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
FAMILIES = {"VPLinear": VPLinear(), "VPCosine": VPCosine(), "DiscreteVP": DDPM, "VE": VE(), "EDM": EDM(),
            "RectifiedFlow": RectifiedFlow()}


def _schedule(sch, solver="unipc", order=2, nfe=4):
    ts = logsnr_uniform(sch, nfe)
    tc = ts.clone()
    tc[1:-1] = tc[1:-1] * 0.99 + tc[2:] * 0.01  # decoupled network times a little below the solver times
    meta = {"schedule": sch.config(), "solver": solver, "order": order, "nfe": nfe, "model_fingerprint": None}
    return LearnedSchedule(ts, tc, meta, sch)


@pytest.fixture
def valid(tmp_path):
    """(path, the saved JSON document) of a valid VPLinear file."""
    path = tmp_path / "sched.json"
    _schedule(VPLinear()).save(path)
    return path, json.loads(path.read_text())


def _write(path, doc):
    path.write_text(json.dumps(doc))  # json writes NaN / Infinity literals, as a hostile file may hold


def _edit(doc, keys, value):
    doc = json.loads(json.dumps(doc))
    target = doc
    for k in keys[:-1]:
        target = target[k]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return doc


DELETE = object()
T = [1.0, 0.5, 0.2, 0.05, 0.001]
CASES = {
    "nan time": (("timesteps",), [1.0, float("nan"), 0.2, 0.05, 0.001], "finite"),
    "+inf time": (("timesteps",), [float("inf"), 0.5, 0.2, 0.05, 0.001], "finite"),
    "-inf time": (("timesteps",), [1.0, 0.5, 0.2, 0.05, float("-inf")], "finite"),
    "nan cond time": (("timesteps_cond",), [1.0, 0.5, float("nan"), 0.05, 0.001], "finite"),
    "times as a string": (("timesteps",), "1.0, 0.5", "list of at least 2 numbers"),
    "times as booleans": (("timesteps",), [True, False], "list of at least 2 numbers"),
    "nested times": (("timesteps",), [[1.0], [0.5]], "list of at least 2 numbers"),
    "one time": (("timesteps",), [1.0], "list of at least 2 numbers"),
    "cond times as a number": (("timesteps_cond",), 5, "list of at least 2 numbers"),
    "increasing times": (("timesteps",), T[::-1], "strictly decreasing"),
    "repeated time": (("timesteps",), [1.0, 0.5, 0.5, 0.05, 0.001], "strictly decreasing"),
    "non-monotone cond times": (("timesteps_cond",), [1.0, 0.2, 0.5, 0.05, 0.001], "timesteps_cond must be decr"),
    "cond times of another length": (("timesteps_cond",), [1.0, 0.5, 0.001], "as many times"),
    "time outside the domain": (("timesteps",), [1.5, 0.5, 0.2, 0.05, 0.001], "outside the domain"),
    "negative time": (("timesteps",), [1.0, 0.5, 0.2, 0.05, -0.1], "outside the domain"),
    "metadata deleted": (("metadata",), DELETE, "metadata must be an object"),
    "metadata a list": (("metadata",), [1, 2], "metadata must be an object"),
    "solver deleted": (("metadata", "solver"), DELETE, "metadata.solver is missing"),
    "nfe deleted": (("metadata", "nfe"), DELETE, "metadata.nfe is missing"),
    "order deleted": (("metadata", "order"), DELETE, "metadata.order is missing"),
    "fingerprint deleted": (("metadata", "model_fingerprint"), DELETE, "model_fingerprint is missing"),
    "schedule deleted": (("metadata", "schedule"), DELETE, "metadata.schedule is missing"),
    "timesteps deleted": (("timesteps",), DELETE, "timesteps are missing"),
    "solver a number": (("metadata", "solver"), 3, "metadata.solver has the wrong type"),
    "unknown solver": (("metadata", "solver"), "rk4", "metadata.solver must be one of"),
    "order a string": (("metadata", "order"), "2", "metadata.order has the wrong type"),
    "order a boolean": (("metadata", "order"), True, "metadata.order has the wrong type"),
    "order the solver lacks": (("metadata", "order"), 7, "order"),
    "nfe a float": (("metadata", "nfe"), 4.0, "metadata.nfe has the wrong type"),
    "nfe not matching the times": (("metadata", "nfe"), 8, "makes 4 model calls"),
    "nfe zero": (("metadata", "nfe"), 0, "nfe must be >= 1"),
    "fingerprint a number": (("metadata", "model_fingerprint"), 12, "model_fingerprint has the wrong type"),
    "schedule a string": (("metadata", "schedule"), "VPLinear", "metadata.schedule has the wrong type"),
    "unknown schedule": (("metadata", "schedule"), {"class": "Cosmic"}, "cannot rebuild the schedule"),
    "schedule with a bad field": (("metadata", "schedule", "beta1"), "big", "cannot rebuild the schedule"),
    "guidance a string": (("metadata", "guidance"), "big", "guidance must be a finite number"),
    "guidance nan": (("metadata", "guidance"), float("nan"), "guidance must be a finite number"),
    "final sigmas type unknown": (("final_sigmas_type",), "half", "final_sigmas_type must be one of"),
    "another format": (("format",), "tdiff-mask", "expected a 'tdiff-learned-schedule' file"),
    "another version": (("format_version",), 1, "format_version"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_refuses_every_damaged_field_with_a_clear_error(valid, case):
    path, doc = valid
    keys, value, match = CASES[case]
    _write(path, _edit(doc, keys, value))
    with pytest.raises(ValueError, match=match) as info:
        LearnedSchedule.load(path)
    assert path.name in str(info.value)


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"a string"', "42", "null", "{not json", ""])
def test_load_refuses_a_file_that_is_not_a_json_object(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        LearnedSchedule.load(path)
    assert path.name in str(info.value)


def test_load_refuses_non_utf8_and_missing_files(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"format": "tdiff-learned-schedule", "x": "\xff\xfe"}')
    with pytest.raises(ValueError, match="UTF-8") as info:
        LearnedSchedule.load(path)
    assert path.name in str(info.value)
    with pytest.raises(ValueError, match="missing.json"):
        LearnedSchedule.load(tmp_path / "missing.json")


def test_discrete_vp_table_is_stored_and_checked(tmp_path):
    path = tmp_path / "ddpm.json"
    _schedule(DDPM).save(path)
    doc = json.loads(path.read_text())
    assert len(doc["schedule_table"]["alphas_cumprod"]) == 1000
    back = LearnedSchedule.load(path)  # no schedule= needed
    assert back.schedule.config() == DDPM.config()
    for keys, value, match in [(("schedule_table",), None, "schedule_table.alphas_cumprod"),
                               (("schedule_table", "alphas_cumprod"), [0.9, "x"], "schedule_table.alphas_cumprod"),
                               (("schedule_table", "alphas_cumprod"), [0.5, 0.9], "not a valid table"),
                               (("metadata", "schedule", "log_alpha_sum"), -3.0, "does not match")]:
        _write(path, _edit(doc, keys, value))
        with pytest.raises(ValueError, match=match):
            LearnedSchedule.load(path)
    _write(path, _edit(doc, ("schedule_table",), None))
    LearnedSchedule.load(path, schedule=DDPM)  # the caller can supply the table


def test_save_refuses_what_load_would_refuse(tmp_path):
    ls = _schedule(VPLinear())
    with pytest.raises(ValueError, match="without metadata"):
        LearnedSchedule(ls.timesteps, None, {"solver": "unipc"}, VPLinear()).save(tmp_path / "a.json")
    with pytest.raises(ValueError, match="makes 4 model calls"):
        LearnedSchedule(ls.timesteps, None, dict(ls.metadata, nfe=3), VPLinear()).save(tmp_path / "a.json")
    assert not (tmp_path / "a.json").exists()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_to_diffusers_round_trips_for_every_schedule(name, tmp_path):
    """Saved, loaded without schedule=, exported: the noise levels (or flow sigmas, or DDPM indices) are the
    schedule's own at the learned times, and map back onto them."""
    sch = FAMILIES[name]
    ls = _schedule(sch)
    path = tmp_path / f"{name}.json"
    ls.save(path)
    back = LearnedSchedule.load(path)
    assert back.schedule.config() == sch.config()
    sig = torch.tensor(back.to_diffusers("sigmas")["sigmas"], dtype=torch.float64)
    # DiscreteVP is rebuilt from alphas_cumprod = exp(2 log alpha): equal to an ulp
    torch.testing.assert_close(sig, torch.tensor(ls.to_diffusers("sigmas")["sigmas"], dtype=torch.float64),
                               rtol=1e-13, atol=0)
    t = sig if name == "RectifiedFlow" else sch.t_from_edm_sigma(sig)
    torch.testing.assert_close(t, ls.timesteps[:-1], rtol=1e-9, atol=1e-12)
    if name == "DiscreteVP":
        idx = back.to_diffusers("timesteps")["timesteps"]
        assert idx == [round(v) for v in (ls.timesteps[:-1] * 1000 - 1).tolist()]
    else:
        with pytest.raises(ValueError, match="DiscreteVP"):
            back.to_diffusers("timesteps")
