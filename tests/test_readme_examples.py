"""The README's diffusers examples run as written: each block marked `<!-- readme-test: <family> -->` is executed
verbatim with `pipe` bound to a tiny random pipeline of that family (the block's from_pretrained line is a comment),
and the learning calls at tiny settings: `tdiff.ld3_learn`'s own keywords (teacher_nfe, n_train, n_val, epochs,
batch_size, init, progress) shrunk, everything the block passes kept."""
import functools
import os
import re

import pytest

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tdiff  # noqa: E402
import diffusers_runs as R  # noqa: E402
from tdiff.schedulers import TdiffScheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
FAMILIES = ("dit", "pixart", "sd", "sd3")
TINY_LD3 = dict(teacher_nfe=8, n_train=2, n_val=2, epochs=1, phase1_epochs=1, batch_size=2, init="logsnr_uniform",
                progress=False)


def readme_blocks() -> dict:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return dict(re.findall(r"<!-- readme-test: (\w+) -->\n```python\n(.*?)```", text, flags=re.S))


def test_the_readme_has_a_complete_example_per_family():
    blocks = readme_blocks()
    assert set(blocks) == set(FAMILIES)
    for family, code in blocks.items():
        assert re.search(r"^# pipe = diffusers\.\w+Pipeline\.from_pretrained\(", code, flags=re.M), family
        for step in ("TdiffScheduler.from_config(pipe.scheduler.config", "(pipe, nfe=", "save_pretrained("):
            assert step in code, (family, step)


@pytest.mark.parametrize("family", FAMILIES)
def test_readme_example_runs_as_written(family, tmp_path, monkeypatch):
    code = readme_blocks()[family]
    pipe = R.readme_pipeline(family)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tdiff, "ld3_learn", functools.partial(tdiff.timesteps.ld3_learn, **TINY_LD3))
    scope = {"pipe": pipe}
    exec(compile(code, f"README.md ({family} example)", "exec"), scope)
    assert isinstance(scope["pipe"].scheduler, TdiffScheduler)
    assert isinstance(scope["pipe"].scheduler.config.timesteps, dict)  # a learned schedule, saved and loaded
