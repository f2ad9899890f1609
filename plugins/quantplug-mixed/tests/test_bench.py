"""bench_mixed.py: rows per configuration, the markdown table with its command, reruns replace their row."""

from __future__ import annotations

import json
from pathlib import Path

from quantplug.testing.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "bench_mixed.py"


def _load():  # type: ignore[no-untyped-def]
    return load_script(SCRIPT)


def test_bench_writes_rows_and_table(tmp_path: Path) -> None:
    bench = _load()
    out = tmp_path / "rows.json"
    argv = ["testing:tiny-resnet", "--bits", "3", "--configs", "uniform", "fisher", "-o", "calib.num_samples=32",
            "--eval-samples", "32", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["uniform", "fisher"]
    uniform, mixed = rows
    assert set(uniform["bit_map"].values()) == {3, 8}
    assert mixed["weight bits (allocated)"] <= 3.0 and mixed["weight KiB"] <= uniform["weight KiB"]
    table = (tmp_path / "rows.md").read_text()
    assert "bench_mixed.py testing:tiny-resnet --bits 3" in table and table.count("| testing:tiny-resnet |") == 2
    assert bench.main([*argv[:4], "fisher", *argv[6:]]) == 0  # rerun of one configuration replaces its row
    assert [r["config"] for r in json.loads(out.read_text())["rows"]] == ["uniform", "fisher"]
