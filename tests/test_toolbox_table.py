"""benchmarks/results/toolbox.md is what benchmarks/toolbox.py makes of the plugins' committed results files."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from quantplug.testing.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


def load_toolbox() -> types.ModuleType:
    return load_script(ROOT / "benchmarks" / "toolbox.py")


def test_committed_toolbox_table_is_up_to_date() -> None:
    assert load_toolbox().main(["--check"]) == 0, "run python benchmarks/toolbox.py"


def test_every_number_of_the_qat_section_comes_from_its_json() -> None:
    toolbox = load_toolbox()
    rows = [r for source in toolbox.QAT_SOURCES for r in json.loads((ROOT / source).read_text())["rows"]]
    table = toolbox.qat_section().table
    for r in rows:
        assert f"| {r['ptq_top1']:.2f} | {r['qat_top1']:.2f} |" in table


def test_a_missing_source_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toolbox = load_toolbox()
    monkeypatch.setattr(toolbox, "ROOT", tmp_path)
    with pytest.raises(toolbox.SourceError, match="missing: run"):
        toolbox.qat_section()
    with pytest.raises(toolbox.SourceError, match="bench_dfq.py"):
        toolbox.dfq_section()
