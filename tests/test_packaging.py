"""Packaging: the sdist holds what the build needs, a build that cannot make tdiff._C says so, an install without
it warns once. (.ci/run builds a wheel from the sdist and imports its extension: too slow for the suite.)"""
import os
import runpy
import subprocess
import sys
import tarfile
import warnings

import pytest

from tdiff import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup_py():
    """setup.py as a module (its build decisions, without running setup())."""
    return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_under_test")


def test_sdist_holds_the_sources_headers_and_shipped_weights(tmp_path):
    # built as pip's backend would, in a subprocess, without torch: an sdist needs none
    code = ("import sys; sys.modules['torch'] = None\n"
            f"sys.argv = ['setup.py', '-q', 'sdist', '--dist-dir', {str(tmp_path)!r}]\n"
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (sdist,) = tmp_path.glob("tdiff-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for folder, ext in [("csrc", ".h"), ("csrc", ".cpp"), ("kernels", ".py")]:
        expected = {f"{folder}/{f}" for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(ext)}
        assert expected and expected <= names, expected - names
    for need in ["setup.py", "pyproject.toml", "MANIFEST.in", "tdiff/py.typed", "tdiff/weights/default_dit.safetensors",
                 "tdiff/weights/default_unet.safetensors", "tdiff/weights/digits_classifier.safetensors",
                 "bench/__main__.py", "tests/conftest.py"]:
        assert need in names, need
    assert not [n for n in names if n.endswith(".so") or n.startswith("bench/results/")]


def test_a_build_without_torch_fails_loudly_instead_of_dropping_the_extension(setup_py, monkeypatch, capsys):
    from setuptools import Distribution

    monkeypatch.setitem(sys.modules, "torch", None)  # as under build isolation
    monkeypatch.delenv("TDIFF_NO_EXT", raising=False)
    ext_modules, cmdclass, requirements = setup_py["extension_and_requirements"]()
    assert [e.name for e in ext_modules] == ["tdiff._C"]  # still declared: the wheel is never a pure-Python one
    with pytest.raises(SystemExit):
        cmdclass["build_ext"](Distribution()).run()
    err = capsys.readouterr().err
    assert "torch is not importable" in err and "--no-build-isolation" in err and "TDIFF_NO_EXT=1" in err


def test_an_opt_out_build_says_so_and_requires_any_recent_torch(setup_py, monkeypatch, capsys):
    monkeypatch.setenv("TDIFF_NO_EXT", "1")
    ext_modules, cmdclass, requirements = setup_py["extension_and_requirements"]()
    assert ext_modules == [] and requirements == ["torch>=2.4"]
    assert "WITHOUT the extension" in capsys.readouterr().err


def test_the_wheel_requires_the_torch_its_extension_was_compiled_against(setup_py, monkeypatch):
    import torch

    monkeypatch.delenv("TDIFF_NO_EXT", raising=False)
    ext_modules, cmdclass, requirements = setup_py["extension_and_requirements"]()
    assert requirements == [f"torch=={torch.__version__.split('+')[0]}"]
    assert [e.name for e in ext_modules] == ["tdiff._C"] and "build_ext" in cmdclass
    assert "safetensors>=0.4" in setup_py["BASE_REQUIREMENTS"]


@pytest.fixture
def fresh_warning_state(monkeypatch):
    monkeypatch.setattr(_extension, "_warned", False)
    monkeypatch.delenv("TDIFF_NO_EXT", raising=False)


def test_an_install_without_the_extension_warns_once_naming_the_opt_out(fresh_warning_state, monkeypatch):
    real = _extension.importlib.util.find_spec
    monkeypatch.setattr(_extension.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tdiff._C" else real(name, *a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _extension.check_installed()
        _extension.check_installed()
        monkeypatch.setenv("TDIFF_NO_EXT", "1")
        assert _extension.load() is False
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "TDIFF_NO_EXT=1" in messages[0] and "reference" in messages[0] and "no tdiff._C" in messages[0]


def test_an_extension_built_for_another_torch_is_not_loaded(fresh_warning_state, monkeypatch):
    monkeypatch.setattr(_extension, "built_for_torch", lambda: "1.0.0")
    with pytest.warns(RuntimeWarning, match=r"compiled against torch 1\.0\.0.*TDIFF_NO_EXT=1"):
        assert _extension.load() is False
    monkeypatch.setattr(_extension, "_warned", False)
    import torch

    monkeypatch.setattr(_extension, "built_for_torch", lambda: torch.__version__.split("+")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extension.load() is True


def test_bench_outside_a_checkout_says_where_the_benchmarks_are(monkeypatch, capsys):
    from tdiff import __main__ as cli

    assert cli._checkout_root() == ROOT  # this suite runs from the checkout
    monkeypatch.setattr(cli, "_checkout_root", lambda: None)
    assert cli.main(["bench", "--quick", "noisy_sample"]) == 2
    assert "python -m bench" in capsys.readouterr().err


def test_package_is_typed_and_documents_only_files_that_exist():
    assert os.path.exists(os.path.join(ROOT, "tdiff", "py.typed"))
    for doc in ("README.md", "setup.py"):
        text = open(os.path.join(ROOT, doc)).read()
        assert "TDIFF_FORCE_CUDA" not in text and "csrc/cuda" not in text, doc
