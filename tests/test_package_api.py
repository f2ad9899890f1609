"""The package-level entry points the README names: quantplug.apply / load / Session / Recipe / QuantSpec."""

from __future__ import annotations

import subprocess
import sys

import pytest

import quantplug


def test_entry_points_are_the_modules_objects() -> None:
    from quantplug import api, config, export, plugins

    assert quantplug.apply is api.apply and quantplug.load is export.load
    assert quantplug.Session is plugins.Session
    assert quantplug.Recipe is config.Recipe and quantplug.QuantSpec is config.QuantSpec
    assert {"apply", "load", "Session", "Recipe", "QuantSpec"} <= set(dir(quantplug))
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        quantplug.lod  # noqa: B018


def test_importing_the_package_does_not_load_the_engine() -> None:
    code = "import sys, quantplug; print(any(m in sys.modules for m in ('quantplug.api', 'quantplug.export')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_saved_run_loads_through_the_package(tmp_path) -> None:  # noqa: ANN001
    import torch

    result = quantplug.apply("nearest", "testing:tiny-resnet", data="synthetic:images", eval_samples=16,
                             overrides={"calib.num_samples": 16, "weight.bits": 4}, out_dir=str(tmp_path / "run"))
    model = quantplug.load(str(tmp_path / "run"))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))
