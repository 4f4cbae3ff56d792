"""`python -m bench gpu` in its tiny mode, under the Triton interpreter (no GPU here): every op runs through its
Triton launcher, is checked against the reference, and is timed against eager, torch.compile and copy; the result
file is written."""
import json


def test_gpu_bench_tiny_mode(monkeypatch, tmp_path):
    import bench.common
    import bench.gpu

    monkeypatch.setattr(bench.common, "RESULTS", str(tmp_path))
    payload = bench.gpu.run(tiny=True)
    assert payload["mode"] == "interpreter"
    ops = {r["op"] for r in payload["records"]}
    assert len(ops) == 10 and any("convert" in o for o in ops) and "cached_block backward" in ops
    assert {r["impl"] for r in payload["records"]} == {"copy", "eager", "tdiff", "torch.compile"}
    for r in payload["records"]:
        assert r["ms"] > 0 and r["max_abs_err_vs_reference"] < 1e-3
    saved = json.loads((tmp_path / "gpu.quick.json").read_text())
    assert saved["name"] == "gpu" and len(saved["records"]) == len(payload["records"])
