"""``quantplug report``: the text summary of a run's manifest and the PNG chart of per-unit losses."""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from quantplug import cli, plugins
from quantplug.api import apply
from quantplug.builtins import reporting
from quantplug.errors import QuantplugError
from quantplug.export import read_manifest
from quantplug.plugins import Session

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("report") / "run")
    apply("nearest", "testing:tiny-resnet", overrides={"calib.num_samples": 64}, eval_samples=50, out_dir=out,
          session=Session(entry_points=False, plugins=[reporting]))
    return out


@pytest.fixture
def report_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI with built-ins only, and the report command even before BUILTIN_MODULES lists its module."""
    monkeypatch.setenv("QUANTPLUG_LOAD_PLUGINS", "")
    if reporting.__name__ not in plugins.BUILTIN_MODULES:
        monkeypatch.setattr(plugins, "BUILTIN_MODULES", (*plugins.BUILTIN_MODULES, reporting.__name__))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND", "truncated PNG"
    return width, height


def test_text_summary_renders_every_part_of_the_manifest(run_dir: str) -> None:
    manifest = read_manifest(run_dir)
    text = reporting.render_report(manifest, run_dir)
    assert f"quantplug run {run_dir}" in text
    assert "model:   testing:tiny-resnet" in text and "synthetic:images" in text and "evaluation samples: 50" in text
    assert "recipe: nearest" in text and "4-bit asymmetric per_channel(axis=0), observer mse" in text
    assert "8-bit asymmetric per_tensor" in text and "rounding nearest" in text and "scheduler block" in text
    assert "calibration 64 samples" in text
    assert "rounding:nearest" in text and "quantplug" in text  # providers table
    # bit map: every layer with its widths, first and last at 8 bits
    for layer in manifest["bit_map"]:
        assert layer["name"] in text
    assert f"bit map ({len(manifest['bit_map'])} layers)" in text
    # plan and units: each unit with its losses, iterations and pass
    assert "plan (5 units, scheduler block): stem, layer1.0, layer1.1, layer2.0, head" in text
    for unit in manifest["units"]:
        row = next(line for line in text.splitlines() if line.split()[:2] == [str(unit["index"]), unit["name"]])
        assert f"{unit['loss_before']:.4g}" in row and f"{unit['loss_after']:.4g}" in row
    # metrics: full precision vs quantized with the delta
    fp, quant = manifest["metrics"]["fp"]["top1"], manifest["metrics"]["quant"]["top1"]
    top1 = next(line for line in text.splitlines() if line.strip().startswith("top1"))
    assert top1.split()[1:] == [f"{fp:.2f}", f"{quant:.2f}", f"{quant - fp:+.2f}"]
    assert f"torch {manifest['environment']['torch']}" in text


def test_png_chart_is_a_valid_png(run_dir: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "charts" / "losses.png"
    assert reporting.plot_unit_losses(read_manifest(run_dir), path) == str(path)
    width, height = png_size(path)
    assert width > 100 and height > 100 and path.stat().st_size > 1000
    assert sorted(p.name for p in path.parent.iterdir()) == ["losses.png"]  # no temporary file left behind


def test_cli_report_prints_summary_and_writes_png(run_dir: str, tmp_path: Path, report_cli: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "chart.png"
    assert cli.main(["report", run_dir, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "recipe: nearest" in out and "units (5 reconstructed" in out and f"loss chart written to {png}" in out
    png_size(png)


def test_without_matplotlib_the_chart_says_what_to_install(run_dir: str, tmp_path: Path, report_cli: None,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(QuantplugError, match="pip install matplotlib"):
        reporting.plot_unit_losses(read_manifest(run_dir), tmp_path / "x.png")
    assert cli.main(["report", run_dir, "--png", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert "recipe: nearest" in captured.out  # the text summary needs nothing extra
    assert "pip install matplotlib" in captured.err and not (tmp_path / "x.png").exists()


def test_report_of_a_directory_that_is_not_a_run_is_one_clear_line(tmp_path: Path, report_cli: None,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no quantplug.json" in err and len(err.strip().splitlines()) == 1


def _synthetic_manifest(num_layers: int) -> dict[str, Any]:
    units = []
    for p, pass_name in enumerate(("weights", "activations")):
        for i, name in enumerate(("stem", "block", "head")):
            units.append({"index": i, "name": name, "layers": [f"{name}.conv"], "loss_before": 10.0 ** (i - 3),
                          "loss_after": 0.5 * 10.0 ** (i - 3), "iters": 100 * (p + 1), "seconds": 1.5,
                          "pass_name": pass_name})
    return {
        "model_id": "testing:tiny-resnet", "recipe": {"name": "brecq", "activation": None},
        "bit_map": [{"name": f"layer{i}", "weight_bits": 8 if i in (0, num_layers - 1) else 4, "input_bits": None}
                    for i in range(num_layers)],
        "plan": ["stem", "block", "head"], "units": units,
    }


def test_weights_first_passes_many_layers_and_missing_fields(tmp_path: Path) -> None:
    text = reporting.render_report(_synthetic_manifest(40))
    assert "stem [weights]" in text and "head [activations]" in text and "-50.0%" in text
    assert "units (6 reconstructed, 900 iterations, 9.0 s)" in text
    # 40 layers: summarized per bit-width pair; activations in full precision
    assert "bit map (40 layers)" in text and "layer0, layer39" in text
    assert "metrics: none recorded" in text and "activations full precision" in text
    pytest.importorskip("matplotlib")
    png_size(Path(reporting.plot_unit_losses(_synthetic_manifest(3), tmp_path / "passes.png")))


def test_chart_of_a_run_without_units_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QuantplugError, match="no reconstruction units"):
        reporting.plot_unit_losses({"units": []}, tmp_path / "none.png")
