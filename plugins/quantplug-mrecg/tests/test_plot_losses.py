"""plot_losses.py on real runs of testing:tiny-resnet: block-wise QDrop and MRECG + QDrop."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from quantplug.plugins import Session
from quantplug.testing.scripts import load_script

torch.set_num_threads(1)

SCRIPT = Path(__file__).resolve().parents[1] / "plot_losses.py"
OVERRIDES = {"weight.bits": 3, "activation.bits": 4, "recon.iters": 20, "calib.num_samples": 64,
             "calib.batch_size": 32}


def _script() -> ModuleType:
    return load_script(SCRIPT)


def test_oscillation_is_the_total_of_the_drops() -> None:
    plot_losses = _script()
    assert plot_losses.oscillation([1.0, 3.0, 2.0, 5.0, 1.0]) == pytest.approx(1.0 + 4.0)
    assert plot_losses.oscillation([1.0, 2.0, 4.0]) == 0.0


def test_plots_runs_of_tiny_resnet(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from quantplug.api import apply

    plot_losses = _script()
    runs = {}
    for name, recipe, base in (("qdrop", "qdrop", None), ("mrecg", "mrecg", "qdrop")):
        out = tmp_path / name
        apply(recipe, "testing:tiny-resnet", base=base, session=Session(), overrides=OVERRIDES, eval_samples=32,
              evaluate_fp=False, out_dir=str(out))
        runs[name] = out
    manifest = json.loads((runs["mrecg"] / "quantplug.json").read_text())
    assert [u["name"] for u in manifest["units"]] == ["stem", "layer1.0", "layer1.1+layer2.0", "head"]

    block, mixed = plot_losses.series_of(runs["qdrop"]), plot_losses.series_of(runs["mrecg"])
    assert len(block) == len(mixed) == 1
    assert block[0].depth == [1, 3, 5, 8, 9] and mixed[0].depth == [1, 3, 8, 9]  # layers reconstructed so far
    assert "mrecg+qdrop" in mixed[0].label

    png = tmp_path / "plots" / "losses.png"
    assert plot_losses.main([str(runs["qdrop"]), str(runs["mrecg"]), "--out", str(png), "--before"]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not [p for p in png.parent.iterdir() if p != png]  # no temporary file left behind
    assert plot_losses.main([str(tmp_path / "missing"), "--out", str(png)]) == 2


def test_reads_runs_out_of_a_fidelity_json(tmp_path: Path) -> None:
    plot_losses = _script()
    units = [{"index": i, "name": n, "layers": ["a"] * k, "loss_before": 2.0 * v, "loss_after": v, "iters": 5,
              "seconds": 0.1, "pass_name": "joint"} for i, (n, k, v) in enumerate([("stem", 1, 1.0), ("b1", 2, 3.0),
                                                                                    ("b2", 3, 2.0)])]
    data = {"rows": [{"model": "m", "setting": "W2A4", "method": "mrecg+qdrop",
                      "runs": [{"seed": 0, "recipe": {"name": "mrecg+qdrop"}, "unit_records": units},
                               {"seed": 1, "error": "boom"}]}]}
    path = tmp_path / "fidelity.json"
    path.write_text(json.dumps(data))
    (series,) = plot_losses.series_of(f"{path}#m/W2A4/mrecg+qdrop/0")
    assert series.depth == [1, 3, 6] and series.after == [1.0, 3.0, 2.0] and series.before == [2.0, 6.0, 4.0]
    assert series.label.startswith("W2A4/mrecg+qdrop/0")
    assert plot_losses.oscillation(series.after) == pytest.approx(1.0)
    for bad, match in ((f"{path}#m/W2A4/mrecg+qdrop/1", "no per-unit records"), (f"{path}#m/W2A4/qdrop/0", "no such"),
                       (f"{path}#m/W2A4", "FILE.json#MODEL"), (f"{tmp_path}/x.json#m/W2A4/q/0", "not found")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            plot_losses.load_run(bad)
