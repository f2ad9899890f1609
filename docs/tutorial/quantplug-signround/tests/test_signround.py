"""quantplug-signround: the conformance suite, the rounding rule by hand, and the recipe end to end."""

from __future__ import annotations

import pytest
import torch
from quantplug_signround import SignRound
from torch import nn

from quantplug.config import PerChannel, QuantSpec
from quantplug.errors import ConfigError
from quantplug.modules import QuantLinear
from quantplug.plugins import Session
from quantplug.quantizer import qparams_from_range, to_rows
from quantplug.testing.conformance import RecipeSmoke, RoundingConformance

torch.set_num_threads(1)


class TestSignRoundConformance(RoundingConformance):
    component = SignRound


class TestSignRoundRecipe(RecipeSmoke):
    recipe = "signround"


def _layer(symmetric: bool = False) -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(24, 6), QuantSpec(4, symmetric, PerChannel(0)), None)
    rows = to_rows(layer.weight.detach(), layer.weight_spec)
    layer.weight_quantizer.set_qparams(*qparams_from_range(rows.min(1).values, rows.max(1).values, layer.weight_spec))
    return layer


@pytest.mark.parametrize("symmetric", [False, True])
def test_default_rounds_toward_zero(symmetric: bool) -> None:
    layer = _layer(symmetric)
    spec, q = layer.weight_spec, layer.weight_quantizer
    codes = to_rows(SignRound().attach(layer).hard_codes(), layer.weight_spec)
    x = to_rows(layer.weight.detach(), layer.weight_spec) / q.scale[:, None]
    assert torch.equal(codes, torch.clamp(torch.trunc(x) + q.zero_point[:, None], spec.qmin, spec.qmax))
    w_hard = layer.dequantize_codes(SignRound().attach(layer).hard_codes())
    assert (w_hard.abs() <= layer.weight.abs() + 1e-6).all()  # no weight grows


def test_threshold_one_half_is_nearest() -> None:
    layer = _layer()
    rounding = SignRound(SignRound.make_config({"threshold": 0.5}))
    assert torch.equal(rounding.attach(layer).hard_codes(), layer.nearest_codes())


def test_bad_threshold_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        SignRound(SignRound.make_config({"threshold": 0.0})).attach(_layer())


def test_installed_plugin_registers_rounding_and_recipe() -> None:
    session = Session(entry_points=True)
    assert session.roundings.get("signround") is SignRound
    assert session.recipes.get("signround").presets["half-away"] == {"rounding.options.threshold": 0.5}
