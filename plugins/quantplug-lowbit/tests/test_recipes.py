"""Recipes bwn / binaryconnect / twn end to end: layer choice, exact closed-form weights, save / load, int export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import quantplug_lowbit
import torch
from quantplug_lowbit import binary_scale, binary_signs, twn_codes, twn_scale, twn_threshold

from quantplug.api import apply
from quantplug.builtins import exporters
from quantplug.builtins.exporters import IntExporter, load_packed
from quantplug.cli import main
from quantplug.export import load
from quantplug.modules import quant_layers
from quantplug.plugins import Session
from quantplug.quantizer import to_rows
from quantplug.recipes import resolve_recipe
from quantplug.testing.data import synthetic_images

FAST = {"calib.num_samples": 32, "calib.batch_size": 32}
FIRST, LAST = "stem.conv", "head.fc"


def _session() -> Session:
    return Session(entry_points=False, plugins=[quantplug_lowbit, exporters])


def test_recipes_resolve_to_the_papers_settings() -> None:
    s = _session()
    bwn, bc, twn, ttq = (resolve_recipe(s, n) for n in ("bwn", "binaryconnect", "twn", "ttq"))
    for r in (bwn, bc, twn, ttq):
        assert r.activation is None and r.weight.bits == 2 and r.weight.symmetric
    assert (bwn.rounding.name, bwn.weight.granularity.kind) == ("binary", "per_channel")
    assert (bwn.bits.first_layer_bits, bwn.bits.last_layer_bits) == (0, 0)  # XNOR-Net code: full precision
    assert bc.rounding.options == {"stochastic": True} and bc.weight.granularity.kind == "per_tensor"
    assert (bc.bits.first_layer_bits, bc.bits.last_layer_bits) == (None, None)  # every layer binary
    assert (twn.rounding.name, twn.weight.granularity.kind) == ("ternary", "per_tensor")
    assert (twn.bits.first_layer_bits, twn.bits.last_layer_bits) == (None, None)
    assert [p.name for p in ttq.passes] == ["ttq"] and (ttq.bits.first_layer_bits, ttq.bits.last_layer_bits) == (0, 0)
    for r in (bwn, bc, twn):
        assert r.recon.iters == 0
    rec = resolve_recipe(s, "bwn", preset="reconstruct")
    assert rec.rounding.options == {"learn_latent": True} and rec.recon.iters > 0


def _run(recipe: str, out: Path, **overrides: Any) -> Any:
    return apply(recipe, "testing:tiny-resnet", session=_session(), out_dir=str(out), eval_samples=64,
                 evaluate_fp=False, overrides={**FAST, **overrides})


@pytest.mark.parametrize("recipe", ["bwn", "binaryconnect", "twn"])
def test_hardened_weights_are_the_closed_form_and_reload_identically(recipe: str, tmp_path: Path) -> None:
    result = _run(recipe, tmp_path / "run")
    layers = dict(quant_layers(result.model))
    spec = resolve_recipe(_session(), recipe)
    full_precision = {FIRST, LAST} if spec.bits.first_layer_bits == 0 else set()
    for name, layer in layers.items():
        if name in full_precision:
            assert layer.weight_spec is None
            continue
        rows = to_rows(layer.weight.detach(), layer.weight_spec)
        hard = to_rows(layer.quantized_weight(), layer.weight_spec)
        codes = to_rows(layer.weight_codes.float(), layer.weight_spec)
        if recipe == "twn":
            ternary = twn_codes(rows, twn_threshold(rows))
            assert torch.allclose(hard, ternary * twn_scale(rows, ternary)[:, None])
            assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
        else:
            scale = binary_scale(rows)[:, None]
            assert torch.allclose(hard.abs(), scale.expand_as(hard))
            if recipe == "bwn":
                assert torch.equal(torch.sign(hard), binary_signs(rows))
            assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    x = synthetic_images(16, "test", 2).tensors[0]
    reloaded = load(str(tmp_path / "run"), session=_session())
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))
    IntExporter().export(result.model, tmp_path / "run", tmp_path / "int", session=_session())
    packing = json.loads((tmp_path / "int" / "quantplug.json").read_text())["packing"]
    assert packing["version"] == 1 and {v["bits"] for v in packing["layers"].values()} == {2}
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "int", session=_session())(x), result.model(x))


def test_reconstruct_preset_lowers_every_binary_unit_loss(tmp_path: Path) -> None:
    result = apply("bwn", "testing:tiny-resnet", preset="reconstruct", session=_session(), eval_samples=64,
                   evaluate_fp=False, overrides={"calib.num_samples": 128, "calib.batch_size": 64,
                                                 "recon.iters": 400})
    binary_units = [r for r in result.records if r.name not in ("stem", "head")]  # stem / head stay float
    assert binary_units and all(r.loss_after < r.loss_before for r in binary_units)


def test_cli_runs_twn(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("quantplug.cli._session", _session)
    code = main(["apply", "--plugin", "twn", "testing:tiny-resnet", "--calib-samples", "32", "--eval-samples", "64",
                 "--out", str(tmp_path / "cli")])
    assert code == 0
    assert "twn on testing:tiny-resnet: W2A32" in capsys.readouterr().out
