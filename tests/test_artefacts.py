"""tdiff.artefacts: atomic writes (symlinks, failures, killed writers), size limits, clear errors, fingerprints."""
import json
import os
import signal
import time

import pytest
import torch

from tdiff import artefacts
from tdiff.artefacts import (fingerprint_module, load_json, load_safetensors, load_torch, save_json,
                             save_safetensors, save_torch)

FMT = "tdiff-test-artefact"


def _temporaries(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith(".tmp-"))


def test_roundtrip_each_container(tmp_path):
    save_json(tmp_path / "a.json", FMT, 1, {"x": [1, 2]})
    assert load_json(tmp_path / "a.json", FMT, 1)["x"] == [1, 2]
    save_torch(tmp_path / "a.pt", FMT, 1, {"t": torch.arange(3)})
    assert torch.equal(load_torch(tmp_path / "a.pt", FMT, 1)["t"], torch.arange(3))
    save_safetensors(tmp_path / "a.safetensors", FMT, 1, {"w": torch.ones(2, 2)}, {"note": "n"})
    doc, tensors = load_safetensors(tmp_path / "a.safetensors", FMT, 1)
    assert doc["note"] == "n" and doc["tdiff_version"] and torch.equal(tensors["w"], torch.ones(2, 2))
    with pytest.raises(ValueError, match="format_version 1, this tdiff reads 2"):
        load_safetensors(tmp_path / "a.safetensors", FMT, 2)
    assert not _temporaries(tmp_path)


def test_saving_over_a_symlink_writes_its_target(tmp_path):
    target = tmp_path / "real" / "mask.json"
    save_json(target, FMT, 1, {"v": 1})
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    save_json(link, FMT, 1, {"v": 2})
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert load_json(target, FMT, 1)["v"] == 2
    assert os.stat(target).st_mode & 0o777 == 0o640  # the target keeps its permissions
    assert not _temporaries(tmp_path) and not _temporaries(target.parent)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failed_write_leaves_nothing_behind(tmp_path, error):
    path = tmp_path / "a.json"
    save_json(path, FMT, 1, {"v": 1})

    def fail(f):
        f.write("partial")
        raise error("writer died")

    with pytest.raises(error):
        artefacts._atomic_write(str(path), fail, binary=False)
    assert not _temporaries(tmp_path)
    assert load_json(path, FMT, 1)["v"] == 1  # the previous artefact is intact
    with pytest.raises(Exception):
        save_torch(tmp_path / "b.pt", FMT, 1, {"f": lambda: 0})  # unpicklable payload
    assert not _temporaries(tmp_path) and not (tmp_path / "b.pt").exists()


def test_temporaries_of_killed_writers_are_swept_by_the_next_write(tmp_path):
    # a real writer (a forked child: no interpreter start-up), killed with SIGKILL in the middle of its write
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write, say so, wait to be killed
        def slow(f):
            f.write(b"x" * 1000)
            f.flush()
            os.write(write_end, b"w")
            time.sleep(60)

        try:
            artefacts._atomic_write(str(tmp_path / "big.pt"), slow, binary=True)
        finally:
            os._exit(1)
    assert os.read(read_end, 1) == b"w"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read_end)
    os.close(write_end)
    left = _temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".tmp-tdiff-{artefacts._HOST}-{pid}-")
    # another host's temporary: kept while fresh, swept once stale; files tdiff did not write are never touched
    fresh, stale = tmp_path / ".tmp-tdiff-00000000-1-fresh", tmp_path / ".tmp-tdiff-00000000-1-stale"
    mine = tmp_path / ".tmp-user-notes"
    for p in (fresh, stale, mine):
        p.write_bytes(b"x")
    old = time.time() - artefacts.STALE_TMP_AGE_S - 60
    os.utime(stale, (old, old))
    os.utime(mine, (old, old))
    save_json(tmp_path / "next.json", FMT, 1, {})
    assert _temporaries(tmp_path) == sorted([fresh.name, mine.name])


def test_loaders_refuse_oversized_files_before_reading(tmp_path, monkeypatch):
    save_json(tmp_path / "a.json", FMT, 1, {"pad": "x" * 4000})
    with pytest.raises(ValueError, match=r"a\.json.*MiB.*limit.*max_bytes"):
        load_json(tmp_path / "a.json", FMT, 1, max_bytes=1000)
    assert load_json(tmp_path / "a.json", FMT, 1, max_bytes=10_000)["pad"]
    monkeypatch.setattr(artefacts, "MAX_TORCH_BYTES", 1000)
    save_torch(tmp_path / "a.pt", FMT, 1, {"t": torch.zeros(1000)})
    save_safetensors(tmp_path / "a.safetensors", FMT, 1, {"t": torch.zeros(1000)}, {})
    for load, name in [(load_torch, "a.pt"), (load_safetensors, "a.safetensors")]:
        with pytest.raises(ValueError, match="limit"):
            load(tmp_path / name, FMT, 1)
        load(tmp_path / name, FMT, 1, max_bytes=1 << 20)


def test_unreadable_files_give_errors_that_name_the_file(tmp_path):
    bad = {"list.json": b"[1, 2]", "latin1.json": '{"a": "\u00e9"}'.encode("latin-1"), "trunc.json": b'{"a": ',
           "empty.pt": b"", "text.safetensors": b"not safetensors"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    for name in bad:
        load = {"json": load_json, "pt": load_torch, "safetensors": load_safetensors}[name.rsplit(".", 1)[1]]
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load(tmp_path / name, FMT, 1)
    with pytest.raises(ValueError, match="holds a list"):
        load_json(tmp_path / "list.json", FMT, 1)
    save_torch(tmp_path / "list.pt", FMT, 1, {})
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        load_torch(tmp_path / "list.pt", FMT, 1)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="without tdiff metadata"):
        load_safetensors(tmp_path / "plain.safetensors", FMT, 1)


def test_non_finite_tensors_are_refused_by_name(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, FMT, 1, {"ok": torch.ones(2), "bad": torch.tensor([1.0, float("nan")])}, {})
    with pytest.raises(ValueError, match="'bad' holds NaN or inf"):
        load_safetensors(path, FMT, 1)
    save_safetensors(path, FMT, 1, {"inf": torch.tensor([float("inf")], dtype=torch.float16)}, {})
    with pytest.raises(ValueError, match="'inf'"):
        load_safetensors(path, FMT, 1)


def test_fingerprint_hashes_the_bytes_and_is_cached(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    permuted = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        permuted.load_state_dict(model.state_dict())
        permuted[0].weight.copy_(model[0].weight.flip(1))  # same sum and sum of squares, other model
    fp = fingerprint_module(model)
    assert fp != fingerprint_module(permuted)
    twin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    twin.load_state_dict(model.state_dict())
    assert fingerprint_module(twin) == fp

    calls = []
    real = artefacts.hashlib.sha256
    monkeypatch.setattr(artefacts.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert fingerprint_module(model) == fp and not calls  # cached
    with torch.no_grad():
        model[1].bias.add_(1.0)  # an in-place change bumps the version counter: recomputed
    assert fingerprint_module(model) != fp and len(calls) == 1
    model[1].bias.data = model[1].bias.data - 1.0  # reassigned storage: recomputed
    assert fingerprint_module(model) == fp and len(calls) == 2
    model[1].bias.data.add_(1.0)  # through .data: the version counter does not see it, refresh=True does
    assert fingerprint_module(model, refresh=True) != fp


def test_json_writer_output_is_plain_utf8(tmp_path):
    save_json(tmp_path / "u.json", FMT, 1, {"name": "\u00e9t\u00e9"})
    raw = (tmp_path / "u.json").read_bytes()
    assert json.loads(raw.decode("utf-8"))["name"] == "\u00e9t\u00e9"
