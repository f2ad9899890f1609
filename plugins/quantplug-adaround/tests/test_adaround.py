"""AdaRound maths: initialization, rectified sigmoid, regularizer schedule, hard rounding; conformance."""

from __future__ import annotations

import pytest
import torch
from quantplug_adaround import AdaRoundRounding, beta_schedule, rectified_sigmoid
from torch import nn

from quantplug.config import PerChannel, QuantSpec
from quantplug.modules import QuantLinear
from quantplug.quantizer import qparams_from_range, to_rows
from quantplug.testing.conformance import RecipeSmoke, RoundingConformance


def _layer(bits: int = 4) -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(24, 6), QuantSpec(bits, False, PerChannel(0)), None)
    rows = to_rows(layer.weight.detach(), layer.weight_spec)
    layer.weight_quantizer.set_qparams(*qparams_from_range(rows.min(1).values, rows.max(1).values, layer.weight_spec))
    return layer


def test_initial_soft_weight_equals_fp_weight_inside_grid() -> None:
    layer = _layer()
    rounder = AdaRoundRounding().attach(layer)
    frac = to_rows(layer.weight, layer.weight_spec) / layer.weight_quantizer.scale[:, None]
    codes = frac + layer.weight_quantizer.zero_point[:, None]
    inside = (codes >= layer.weight_spec.qmin) & (codes <= layer.weight_spec.qmax)  # not clipped
    assert inside.float().mean() > 0.9
    assert torch.allclose(rounder()[inside], layer.weight[inside], atol=1e-5)
    assert torch.allclose(rounder.soft(), frac - torch.floor(frac), atol=1e-5)


def test_rectified_sigmoid_limits() -> None:
    v = torch.tensor([-100.0, 0.0, 100.0])
    assert rectified_sigmoid(v, 1.1, -0.1).tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_beta_schedule_matches_official_linear_decay() -> None:
    assert beta_schedule(0.1, 20, 2, 0.2) is None
    assert beta_schedule(0.2, 20, 2, 0.2) == pytest.approx(20)
    assert beta_schedule(0.6, 20, 2, 0.2) == pytest.approx(11)
    assert beta_schedule(1.0, 20, 2, 0.2) == pytest.approx(2)


def test_regularizer_value_by_hand() -> None:
    layer = _layer()
    rounder = AdaRoundRounding(AdaRoundRounding.make_config({"reg_weight": 0.5})).attach(layer)
    with torch.no_grad():
        rounder.v.fill_(0.0)  # h = 0.5 everywhere: 1 - 0^beta = 1 per weight
    assert rounder.regularization(0.1) is None
    assert float(rounder.regularization(0.5)) == pytest.approx(0.5 * layer.weight.numel())
    with torch.no_grad():
        rounder.v.fill_(50.0)  # h = 1: no penalty
    assert float(rounder.regularization(0.9)) == pytest.approx(0.0)


def test_hard_codes_round_up_where_v_nonnegative() -> None:
    layer = _layer(3)
    rounder = AdaRoundRounding().attach(layer)
    with torch.no_grad():
        rounder.v.copy_(torch.where(torch.arange(rounder.v.numel()).reshape(rounder.v.shape) % 2 == 0, 1.0, -1.0))
    codes = to_rows(rounder.hard_codes(), layer.weight_spec)
    zp = layer.weight_quantizer.zero_point[:, None]
    expected = torch.clamp(rounder.floor + (rounder.v >= 0).float() + zp, 0, 7)
    assert torch.equal(codes, expected)


class TestAdaRoundConformance(RoundingConformance):
    component = AdaRoundRounding


class TestAdaRoundRecipe(RecipeSmoke):
    recipe = "adaround"
