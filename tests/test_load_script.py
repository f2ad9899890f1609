"""quantplug.testing.scripts.load_script: stand-alone scripts imported for their tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from quantplug.testing.scripts import load_script


def test_script_with_a_dataclass_loads_and_registers(tmp_path: Path) -> None:
    script = tmp_path / "tool.py"
    script.write_text("from dataclasses import dataclass\n\n@dataclass\nclass Row:\n    x: int\n\nVALUE = Row(3)\n")
    module = load_script(script)
    assert module.VALUE.x == 3 and sys.modules["quantplug_script_tool"] is module


def test_missing_and_broken_scripts_say_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such script"):
        load_script(tmp_path / "absent.py")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RuntimeError, match="boom"):
        load_script(broken, name="broken_script")
    assert "broken_script" not in sys.modules
