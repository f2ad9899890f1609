"""Layers the bit policy gives another width than the method's: nearest rounding at that width, not binary /
ternary codes; and the run-start warnings (nothing at the low width, a threshold that zeroes rows)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import quantplug_lowbit
import torch
from quantplug_lowbit import BinaryRounding, TernaryRounding, TTQPass, twn_codes, twn_threshold

from quantplug.api import apply
from quantplug.builtins import exporters
from quantplug.builtins.exporters import IntExporter, load_packed
from quantplug.engine import harden_layer
from quantplug.errors import ConfigError
from quantplug.export import load
from quantplug.modules import QuantLayer, quant_layers
from quantplug.plugins import Session
from quantplug.quantizer import to_rows
from quantplug.testing.conformance import _calibrated_linear
from quantplug.testing.data import synthetic_images

FAST = {"calib.num_samples": 32, "calib.batch_size": 32}
FIRST, LAST = "stem.conv", "head.fc"
ROUNDINGS = [BinaryRounding, TernaryRounding]


def _session() -> Session:
    return Session(entry_points=False, plugins=[quantplug_lowbit, exporters])


def _run(recipe: str, out: Path | None = None, **overrides: Any) -> Any:
    return apply(recipe, "testing:tiny-resnet", session=_session(), out_dir=str(out) if out else None,
                 eval_samples=32, evaluate_fp=False, overrides={**FAST, **overrides})


def _is_nearest_at_its_width(layer: QuantLayer, bits: int) -> bool:
    """The hardened layer has ``bits``-bit weights rounded to nearest on its (observer's) grid, more than 3 values."""
    assert layer.weight_spec is not None and layer.weight_codes is not None and not layer.has_codebook
    return (layer.weight_spec.bits == bits and torch.equal(layer.weight_codes.float(), layer.nearest_codes().float())
            and layer.quantized_weight().unique().numel() > 3)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_a_layer_at_another_width_is_rounded_to_nearest(rounding: type) -> None:
    layer = _calibrated_linear(bits=8)
    layer.rounder = rounding().attach(layer)  # default: binarize / ternarize 2-bit layers only
    harden_layer(layer)
    assert _is_nearest_at_its_width(layer, 8)
    at_eight = _calibrated_linear(bits=8)
    at_eight.rounder = rounding(rounding.make_config({"bits": 8})).attach(at_eight)  # 8 is the low width now
    harden_layer(at_eight)
    assert at_eight.weight_codes.unique().numel() <= 3  # codes z - 1, (z,) z + 1 on the 8-bit grid


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("bits", [1, 9, True, 2.0])
def test_bad_low_bit_width(rounding: type, bits: Any) -> None:
    with pytest.raises(ConfigError, match="bits must"):
        rounding.make_config({"bits": bits})


def test_option_types_are_checked() -> None:
    with pytest.raises(ConfigError, match="epochs"):
        TTQPass.make_config({"epochs": 2.5})
    with pytest.raises(ConfigError, match="threshold_factor"):
        TernaryRounding.make_config({"threshold_factor": "0.7"})


@pytest.mark.parametrize("recipe,overrides,wide", [
    ("twn", {"bits.first_layer_bits": 8, "bits.last_layer_bits": 8}, {FIRST, LAST}),
    ("bwn", {"bits.overrides": [["layer2.*", 8, 0]]}, {"layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"}),
])
def test_recipe_layers_at_8_bits_are_8_bit_in_the_model_and_the_int_export(
        recipe: str, overrides: dict[str, Any], wide: set[str], tmp_path: Path) -> None:
    result = _run(recipe, tmp_path / "run", **overrides)
    layers = {n: m for n, m in quant_layers(result.model) if m.weight_spec is not None}
    assert wide < set(layers)
    for name, layer in layers.items():
        if name in wide:
            assert _is_nearest_at_its_width(layer, 8), name
        else:  # the method's 2-bit layers keep their binary / ternary codes
            assert layer.weight_spec.bits == 2
            codes = set(layer.weight_codes.float().unique().tolist())
            assert codes <= ({-1.0, 0.0, 1.0} if recipe == "twn" else {-1.0, 1.0}), name
    if recipe == "twn":  # the ternary layers are still exactly TWN's closed form
        layer = layers["layer1.0.conv1"]
        rows = to_rows(layer.weight.detach(), layer.weight_spec)
        assert torch.equal(to_rows(layer.weight_codes.float(), layer.weight_spec), twn_codes(rows, twn_threshold(rows)))
    bit_map = {b["name"]: b["weight_bits"] for b in json.loads((tmp_path / "run" / "quantplug.json").read_text())
               ["bit_map"]}
    IntExporter().export(result.model, tmp_path / "run", tmp_path / "int", session=_session())
    packing = json.loads((tmp_path / "int" / "quantplug.json").read_text())["packing"]["layers"]
    for name in wide:
        assert bit_map[name] == 8 and packing[name]["bits"] == 8
    x = synthetic_images(8, "test", 3).tensors[0]
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "int", session=_session())(x), result.model(x))


def test_ttq_ternarizes_only_the_recipe_width(tmp_path: Path) -> None:
    wide = {FIRST, "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"}
    result = _run("ttq", tmp_path / "run", **{"calib.num_samples": 64, "bits.first_layer_bits": 8,
                                             "bits.overrides": [["layer2.*", 8, 0]],
                                             "passes": [{"name": "ttq", "options": {"epochs": 1}}]})
    layers = {n: m for n, m in quant_layers(result.model) if m.weight_spec is not None}
    assert wide < set(layers)
    summary = result.passes["ttq"]
    assert summary["other_widths"] == {name: 8 for name in sorted(wide)}
    assert set(summary["layers"]) == set(layers) - wide
    for name, layer in layers.items():
        if name in wide:
            assert _is_nearest_at_its_width(layer, 8), name
        else:
            assert layer.has_codebook and layer.weight_codebook.numel() == 3
    x = synthetic_images(8, "test", 4).tensors[0]
    with torch.no_grad():
        assert torch.equal(load(str(tmp_path / "run"), session=_session())(x), result.model(x))


def test_ttq_with_no_layer_at_the_recipe_width_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="weight.bits=2"):
        _run("ttq", **{"bits.overrides": [["*", 4, 0]]})


def test_no_layer_at_the_rounding_width_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="quantplug_lowbit"):
        result = _run("twn", **{"weight.bits": 3})
    assert "rounding.options.bits=3" in caplog.text
    layers = [m for _, m in quant_layers(result.model) if m.weight_spec is not None]
    assert layers and all(_is_nearest_at_its_width(m, 3) for m in layers)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quantplug_lowbit"):
        result = _run("twn", **{"weight.bits": 3, "rounding.options.bits": 3})
    assert "rounding.options.bits" not in caplog.text
    assert all(m.weight_codes.unique().numel() <= 3 for _, m in quant_layers(result.model) if m.weight_spec)


def test_a_threshold_that_keeps_no_weight_is_warned_naming_the_layer(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="quantplug_lowbit"):
        _run("twn")
    assert "keeps no weight" not in caplog.text  # the paper's 0.7 keeps weights in every layer
    with caplog.at_level(logging.WARNING, logger="quantplug_lowbit"):
        result = _run("twn", **{"rounding.options.threshold_factor": 50.0})
    names = [n for n, m in quant_layers(result.model) if m.weight_spec is not None]
    for name in names:  # a factor of 50 exceeds max |W| / mean |W| of every tiny-resnet layer: all zeros
        assert f"layer {name} in 1 of its 1 quantization rows" in caplog.text
        assert float(result.model.get_submodule(name).quantized_weight().abs().max()) == 0.0
