"""Bad numbers, types and flag combinations on the way in: one clear error naming the option."""

from __future__ import annotations

import pytest

from quantplug.builtins.testing_models import SyntheticData
from quantplug.cli import main
from quantplug.config import CalibConfig, Recipe, apply_overrides
from quantplug.errors import ConfigError, DataError

TINY = ["apply", "testing:tiny-resnet", "--data", "synthetic:images", "--calib-samples", "16", "--eval-samples", "16",
        "-o", "recon.iters=2", "--no-save"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTPLUG_LOAD_PLUGINS", "")
    monkeypatch.setenv("QUANTPLUG_PROGRESS", "0")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- 1. calibration settings
@pytest.mark.parametrize("field,value", [("num_samples", 0), ("num_samples", -5), ("batch_size", 0)])
def test_calib_config_rejects_non_positive_counts(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"calib.{field} .*at least 1"):
        CalibConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"calib.{field}"):
        apply_overrides(Recipe(), {f"calib.{field}": value})


def test_calib_batch_size_zero_on_the_command_line_is_one_clear_line(capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli(capsys, *TINY, "-o", "calib.batch_size=0")
    assert code == 2 and "calib.batch_size must be at least 1" in err and err.count("\n") == 1


def test_synthetic_source_refuses_non_positive_counts_instead_of_using_the_default() -> None:
    assert len(SyntheticData().load("synthetic:images", "train", num_samples=5, seed=0)) == 5
    assert len(SyntheticData().load("synthetic:images", "test", num_samples=None, seed=0)) == 1000
    for n in (0, -5):  # before: 0 quietly gave 2048 samples, -5 a "negative dimension" RuntimeError
        with pytest.raises(DataError, match="at least 1"):
            SyntheticData().load("synthetic:images", "train", num_samples=n, seed=0)
