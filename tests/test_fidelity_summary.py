"""benchmarks/fidelity_summary.py: the summary and README blocks are what the committed fidelity JSON files give."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from quantplug.testing.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


def load_summary() -> types.ModuleType:
    return load_script(ROOT / "benchmarks" / "fidelity_summary.py")


def test_committed_summary_and_readme_blocks_are_up_to_date() -> None:
    assert load_summary().main(["--check"]) == 0, "run python benchmarks/fidelity_summary.py"


def _run(top1: float, seed: int = 0) -> dict[str, object]:
    return {"seed": seed, "quant": {"top1": top1}, "cpu_seconds": 10.0}


def _write(path: Path, rows: list[dict[str, object]], fp: float = 90.0) -> Path:
    command = f"python benchmarks/fidelity.py --out {path.name}"
    path.write_text(json.dumps({"command": command, "fp": {"m": {"top1": fp}}, "rows": rows}))
    return path


def test_tables_orderings_and_readme_blocks(tmp_path: Path) -> None:
    summary = load_summary()
    main = _write(tmp_path / "fidelity-a.json", [
        {"model": "m", "setting": "W4A4", "method": "qdrop@recon.cache=fp16", "runs": [_run(88.4)]},
        {"model": "m", "setting": "W2A4", "method": "nearest", "runs": [_run(80.0, s) for s in range(3)]},
        {"model": "m", "setting": "W2A4", "method": "adaround", "runs": [_run(85.0), _run(86.0, 1), _run(84.5, 2)]},
        {"model": "m", "setting": "W2A4", "method": "brecq", "runs": [_run(85.5), _run(86.5, 1), _run(85.8, 2)]},
        {"model": "m", "setting": "W2A4", "method": "qdrop", "runs": [_run(85.0), {"seed": 1, "error": "boom"}]},
        {"model": "m", "setting": "W4A4", "method": "pdquant@loss.options.temperature=1.0", "runs": [_run(88.0)]},
        {"model": "m", "setting": "W4A4", "method": "qdrop", "runs": [_run(88.5)]},
    ])
    other = _write(tmp_path / "fidelity-b.json", [  # fewer seeds of a cell the first file has: not used
        {"model": "m", "setting": "W2A4", "method": "nearest", "runs": [_run(10.0)]},
    ])
    tables = summary.load([main, other])
    assert tables.cells[("m", "W2A4", "nearest")].top1 == [80.0, 80.0, 80.0]
    assert tables.cells[("m", "W2A4", "qdrop")].top1 == [85.0]  # the failed seed is left out
    assert ("m", "W4A4", "pdquant") in tables.cells and tables.aliased == {"pdquant@loss.options.temperature=1.0"}
    assert tables.settings("m") == ["W4A4", "W2A4"]
    assert tables.methods("m") == ["nearest", "adaround", "brecq", "qdrop", "pdquant", "qdrop@recon.cache=fp16"]
    table = summary.model_table(tables, "m", ["nearest", "adaround", "pdquant"])
    assert table[2] == "| W4A4 | - | - | 88.00 |"
    assert table[3] == "| W2A4 | 80.00 (80.00..80.00) | 85.17 (84.50..86.00) | - |"
    lines = summary.ordering_lines(tables, "m")
    assert "- W2A4: nearest < adaround: +5.17 points: holds beyond the seed spread" in lines
    assert "- W2A4: adaround < brecq: +0.77 points: holds on the mean only, within the seed spread" in lines
    assert "- W2A4: brecq <= qdrop: -0.93 points: reversed (one seed)" in lines
    assert "- W4A4: qdrop <= pdquant: -0.50 points: reversed (one seed)" in lines
    rendered = summary.render(tables)
    assert "## m (full precision 90.00)" in rendered and "T = 1" in rendered and "fidelity-a.md" in rendered

    readme = "intro\n<!-- fidelity: nearest adaround -->\nold text\n<!-- /fidelity -->\nrest\n"
    summary.MODEL_ORDER = ("m",)
    updated = summary.update_readme(readme, tables)
    assert updated.startswith("intro\n<!-- fidelity: nearest adaround -->\n**m** (full precision 90.00")
    assert "old text" not in updated and updated.endswith("<!-- /fidelity -->\nrest\n")
    assert "nearest < adaround" in updated and "brecq" not in updated
    assert summary.update_readme(updated, tables) == updated


def test_a_cell_takes_the_union_of_the_seeds_of_several_files(tmp_path: Path) -> None:
    summary = load_summary()
    config = {"plugin": "qdrop", "calib": 512}
    first = _write(tmp_path / "fidelity-a.json", [
        {"model": "m", "setting": "W2A4", "method": "qdrop",
         "runs": [{**_run(85.0, s), "config": config} for s in (0, 1, 3)]},
    ])
    second = _write(tmp_path / "fidelity-b.json", [  # seed 1 again (reused, another number here) and a new seed 2
        {"model": "m", "setting": "W2A4", "method": "qdrop",
         "runs": [{**_run(10.0, 1), "config": config}, {**_run(86.0, 2), "config": config}]},
    ])
    cell = summary.load([second, first]).cells[("m", "W2A4", "qdrop")]
    assert cell.top1 == [85.0, 85.0, 86.0, 85.0] and cell.source == "fidelity-a.md, fidelity-b.md"

    other = _write(tmp_path / "fidelity-c.json", [
        {"model": "m", "setting": "W2A4", "method": "qdrop", "runs": [{**_run(80.0, 5), "config": {"calib": 64}}]},
    ])
    with pytest.raises(summary.SourceError, match="different configurations.*own method label"):
        summary.load([first, other])


def test_a_broken_source_is_a_clear_error(tmp_path: Path) -> None:
    summary = load_summary()
    bad = tmp_path / "fidelity-x.json"
    bad.write_text("{not json")
    with pytest.raises(summary.SourceError, match="rerun benchmarks/fidelity.py"):
        summary.load([bad])


def test_time_to_accuracy_against_the_official_run(tmp_path: Path) -> None:
    summary = load_summary()
    official = {"seed": 0, "quant": {"top1": 86.0}, "cpu_seconds": 1000.0}
    path = _write(tmp_path / "fidelity-t.json", [
        {"model": "m", "setting": "W2A4", "method": "qdrop", "runs": [_run(85.8), _run(85.6, 1)]},  # 10 CPU s each
        {"model": "m", "setting": "W2A4", "method": "qdrop#official", "runs": [official]},
        {"model": "m", "setting": "W2A4", "method": "qdrop#cpu-fast",
         "runs": [{**_run(86.1), "cpu_seconds": 150.0}]},
        {"model": "m", "setting": "W2A4", "method": "qdropx", "runs": [_run(70.0)]},  # another method: not paired
        {"model": "m", "setting": "W2A4", "method": "brecq", "runs": [_run(85.0)]},
        {"model": "m", "setting": "W2A4", "method": "brecq#official", "runs": [{**official, "cpu_seconds": 40.0}]},
        {"model": "m", "setting": "W2A4", "method": "adaround#official", "runs": [official]},  # no fast row: skipped
    ])
    lines = summary.time_to_accuracy_lines(summary.load([path]), "m")
    assert lines == [
        "- W2A4 brecq, the table's schedule: 85.00 vs official 86.00: -1.00 points (target: within 0.3: missed) in "
        "25.0 % of its CPU time (target: at most 20 %: missed)",
        "- W2A4 qdrop, the table's schedule: 85.70 (85.60..85.80) vs official 86.00: -0.30 points (target: within "
        "0.3: met) in 1.0 % of its CPU time (target: at most 20 %: met)",
        "- W2A4 qdrop, preset cpu-fast: 86.10 vs official 86.00: +0.10 points (target: within 0.3: met) in 15.0 % "
        "of its CPU time (target: at most 20 %: met)",
    ]
    assert "Time to accuracy" in summary.render(summary.load([path]))


def test_a_resumed_official_run_counts_its_units_cpu_time(tmp_path: Path) -> None:
    """A run resumed from a checkpoint spans processes: its last process's CPU time is not the run's."""
    summary = load_summary()
    units = [{"seconds": 900.0, "cpu_seconds": 800.0}, {"seconds": 900.0, "cpu_seconds": 1200.0}]
    resumed = {"seed": 0, "quant": {"top1": 86.0}, "cpu_seconds": 950.0, "seconds": 1000.0, "unit_records": units}
    assert summary.run_cpu_seconds(resumed) == 2000.0  # 1 800 s of units in a 1 000 s process: the units' CPU
    old = [{"seconds": 900.0}, {"seconds": 900.0, "cpu_seconds": 1200.0}]  # first unit from before CPU was kept
    assert summary.run_cpu_seconds({**resumed, "unit_records": old}) is None
    whole = {**resumed, "seconds": 5000.0}  # one process did it all: its own CPU time
    assert summary.run_cpu_seconds(whole) == 950.0
    for records, cost in ((units, "in 15.0 % of its CPU time"), (old, "CPU share not measured")):
        path = _write(tmp_path / "fidelity-r.json", [
            {"model": "m", "setting": "W2A4", "method": "qdrop#official",
             "runs": [{**resumed, "unit_records": records}]},
            {"model": "m", "setting": "W2A4", "method": "qdrop#cpu-fast",
             "runs": [{**_run(85.9), "cpu_seconds": 300.0}]},
        ])
        (line,) = summary.time_to_accuracy_lines(summary.load([path]), "m")
        assert line.startswith("- W2A4 qdrop, preset cpu-fast: 85.90 vs official 86.00: -0.10 points") and cost in line
