"""benchmarks/fidelity.py: method and setting syntax, and one tiny end-to-end table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from quantplug.testing.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"


def _load() -> ModuleType:
    return load_script(SCRIPT)


def test_settings_and_methods_parse() -> None:
    fidelity = _load()
    assert fidelity.parse_setting("w2a4") == (2, 4)
    assert fidelity.parse_setting("W4") == (4, 32)
    assert fidelity.setting_name(4, 32) == "W4" and fidelity.setting_name(3, 3) == "W3A3"
    for bad in ("A4", "WA4", "W2A", "W2x4"):
        with pytest.raises(Exception, match="W2A4"):
            fidelity.parse_setting(bad)
    assert fidelity.parse_method("mrecg+qdrop@recon.cache=fp16,recon.iters=7") == {
        "plugin": "mrecg", "base": "qdrop", "preset": None, "overrides": {"recon.cache": "fp16", "recon.iters": 7}}
    assert fidelity.parse_method("adaround") == {"plugin": "adaround", "base": None, "preset": None, "overrides": {}}
    assert fidelity.parse_method("mrecg+qdrop#official@calib.num_samples=1024") == {
        "plugin": "mrecg", "base": "qdrop", "preset": "official", "overrides": {"calib.num_samples": 1024}}
    for bad in ("qdrop#", "#official", "qdrop#a#b"):
        with pytest.raises(Exception, match="PRESET"):
            fidelity.parse_method(bad)
    assert fidelity.rounding_of(fidelity.parse_method("mrecg+qdrop"), "cpu-fast") == "adaround"
    assert fidelity.rounding_of(fidelity.parse_method("flexround"), "cpu-fast") == "flexround"


def test_tiny_table_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "fidelity.md"
    cmd = [sys.executable, str(SCRIPT), "--models", "testing:tiny-resnet", "--data", "synthetic:images",
           "--settings", "W4", "W2A4", "--methods", "nearest", "adaround@recon.cache=fp16", "--seeds-2bit", "2",
           "--calib-samples", "64", "--eval-samples", "64", "--threads", "1", "-o", "recon.iters=2",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["setting"], r["method"]): r for r in data["rows"]}
    assert set(rows) == {(s, m) for s in ("W4", "W2A4") for m in ("nearest", "adaround@recon.cache=fp16")}
    assert [run["seed"] for run in rows[("W2A4", "nearest")]["runs"]] == [0, 1]
    assert len(rows[("W4", "nearest")]["runs"]) == 1
    for row in rows.values():
        for run in row["runs"]:
            assert "error" not in run, run
    ada = rows[("W2A4", "adaround@recon.cache=fp16")]["runs"][0]["recipe"]
    assert ada["recon"]["cache"] == "fp16" and ada["recon"]["iters"] == 2
    assert rows[("W4", "nearest")]["runs"][0]["recipe"]["activation"] is None  # weights only
    assert all(run["code"] not in ("", "unknown") for row in rows.values() for run in row["runs"])  # a commit id
    table = out.read_text()
    assert "| testing:tiny-resnet |" in table and "adaround@recon.cache=fp16" in table
    # --resume reuses every recorded run: nothing is run again
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(out.with_suffix(".json").read_text())["rows"] == data["rows"]
    # a narrower invocation into the same table keeps the rows it did not ask for and lists every command
    narrow_same = [a for a in cmd if a not in ("W2A4", "adaround@recon.cache=fp16")]
    proc = subprocess.run(narrow_same + ["--resume"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = json.loads(out.with_suffix(".json").read_text())
    assert {(r["setting"], r["method"]): r for r in kept["rows"]} == rows
    assert len(kept["commands"]) == 3 and kept["command"] == kept["commands"][-1]
    assert out.read_text().count("- `python benchmarks/fidelity.py") == 3
    # another table reuses them with --reuse; a run recorded with other settings is run again
    other = tmp_path / "other.md"
    narrow = [a for a in cmd if a not in ("W2A4", "adaround@recon.cache=fp16")]
    narrow[narrow.index("--out") + 1] = str(other)
    narrow[narrow.index("--calib-samples") + 1] = "32"
    proc = subprocess.run(narrow + ["--resume", "--reuse", str(out.with_suffix(".json"))], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "running again" in proc.stdout
    (row,) = json.loads(other.with_suffix(".json").read_text())["rows"]
    assert row["runs"][0]["config"]["calib"] == 32 and row["runs"][0]["recipe"]["calib"]["num_samples"] == 32
    narrow[narrow.index("--calib-samples") + 1] = "64"
    proc = subprocess.run(narrow + ["--resume", "--reuse", str(out.with_suffix(".json"))], capture_output=True,
                          text=True, timeout=600)
    (row,) = json.loads(other.with_suffix(".json").read_text())["rows"]
    assert "running again" not in proc.stdout and row == rows[("W4", "nearest")]
    # a corrupt table to reuse is refused before anything runs, with what to do
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"rows": [')
    proc = subprocess.run(narrow + ["--resume", "--reuse", str(corrupt)], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "not a fidelity table JSON" in proc.stderr and "rerun" in proc.stderr


def test_runs_dir_saves_each_run_with_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run is saved under its own directory and applied with ``resume=True``, so a run interrupted between
    units continues from its last checkpoint (the engine's resume is tested in tests/test_engine.py)."""
    import quantplug.api


    fidelity = _load()
    root = str(tmp_path / "runs")
    path = fidelity.run_dir(root, "testing:tiny-resnet", "W2A4", "mrecg+qdrop@recon.cache=fp16", 1)
    assert path == str(tmp_path / "runs" / "testing_tiny-resnet" / "W2A4" / "mrecg+qdrop_at_recon.cache=fp16" / "seed1")
    assert fidelity.run_dir(None, "m", "W2A4", "qdrop", 0) is None
    spec = {"method": "adaround", "plugin": "adaround", "base": None, "model": "testing:tiny-resnet", "w_bits": 2,
            "a_bits": 4, "seed": 0, "calib": 64, "data": "synthetic:images", "eval_samples": 64, "preset": None,
            "overrides": {"recon.iters": 3}, "threads": 1, "evaluate_fp": False,
            "run_dir": fidelity.run_dir(root, "testing:tiny-resnet", "W2A4", "adaround", 0)}
    calls: list[dict[str, object]] = []
    real_apply = quantplug.api.apply

    def recording_apply(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(quantplug.api, "apply", recording_apply)
    out = fidelity.worker(spec)
    assert calls[0]["out_dir"] == spec["run_dir"] and calls[0]["resume"] is True
    assert (Path(spec["run_dir"]) / "quantplug.json").is_file()
    assert out["recon_seconds"] == pytest.approx(sum(r["seconds"] for r in out["unit_records"]))


def test_a_method_preset_overrides_the_table_preset() -> None:
    import argparse

    fidelity = _load()
    args = argparse.Namespace(mobilenet_reg_weight=0.1, calib_samples=512, data=None, eval_samples=None,
                              preset="cpu-fast", threads=1, runs_dir=None)

    def spec(method: str) -> dict[str, object]:
        return fidelity.run_spec(args, {}, "testing:tiny-resnet", (2, 4), method, fidelity.parse_method(method), 0,
                                 adaround=False, evaluate_fp=False)

    assert spec("qdrop")["preset"] == "cpu-fast"
    assert spec("qdrop#official")["preset"] == "official" and spec("qdrop#official")["plugin"] == "qdrop"
    assert spec("nearest")["preset"] is None
