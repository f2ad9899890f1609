"""Annealing softmax: schedule, initialization, annealing to one-hot, the analytic gradient, hard codes."""

from __future__ import annotations

import math

import pytest
import torch
from quantplug_nwq import AnnealingSoftmaxRounder, AnnealingSoftmaxRounding, gaussian_logits_with_mean, temperature_at
from quantplug_nwq.rounding import _SoftmaxExpectation

from quantplug.errors import ConfigError
from quantplug.testing.conformance import RoundingConformance, _calibrated_linear

torch.set_num_threads(1)

WIDE = (-1, 0, 1, 2)


class TestAnnealingSoftmaxConformance(RoundingConformance):
    component = AnnealingSoftmaxRounding
    options = {}


class TestAnnealingSoftmaxWideConformance(RoundingConformance):
    component = AnnealingSoftmaxRounding
    options = {"offsets": WIDE}


def _rounder(bits: int = 4, **options: object) -> AnnealingSoftmaxRounder:
    layer = _calibrated_linear(bits=bits)
    rounder = AnnealingSoftmaxRounding(AnnealingSoftmaxRounding.make_config(options)).attach(layer)
    assert isinstance(rounder, AnnealingSoftmaxRounder)
    return rounder


def _steps(rounder: AnnealingSoftmaxRounder) -> torch.Tensor:
    """Weight / scale + zero point clipped to the grid, minus the zero point: the continuous codes."""
    layer = rounder.layer[0]
    q, spec = layer.weight_quantizer, layer.weight_spec
    zp = q.zero_point[:, None]
    return torch.clamp(layer.weight.detach() / q.scale[:, None] + zp, spec.qmin, spec.qmax) - zp


# --------------------------------------------------------------------------- temperature schedule
def test_temperature_is_geometric_from_start_to_end_after_warmup() -> None:
    assert temperature_at(0.0, 1.0, 0.01) == 1.0
    assert temperature_at(1.0, 1.0, 0.01) == pytest.approx(0.01)
    assert temperature_at(0.5, 1.0, 0.01) == pytest.approx(0.1)  # geometric midpoint
    assert temperature_at(0.2, 2.0, 0.02, warmup=0.2) == 2.0
    assert temperature_at(0.6, 2.0, 0.02, warmup=0.2) == pytest.approx(0.2)
    values = [temperature_at(p / 20, 1.0, 0.01, warmup=0.1) for p in range(21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_step_sets_the_scheduled_temperature() -> None:
    r = _rounder(tau_start=2.0, tau_end=0.05, warmup=0.25)
    assert r.tau == 2.0
    r.step(0.25 + 0.75 / 2)
    assert r.tau == pytest.approx(math.sqrt(2.0 * 0.05))
    r.step(1.0)
    assert r.tau == pytest.approx(0.05)


# --------------------------------------------------------------------------- initialization
@pytest.mark.parametrize("offsets", [(0, 1), WIDE])
@pytest.mark.parametrize("bits", [2, 4])
def test_fractional_init_starts_at_the_weight_with_nearest_mode(offsets: tuple[int, ...], bits: int) -> None:
    r = _rounder(bits, offsets=offsets)
    target = _steps(r)
    assert torch.allclose(r.soft_codes(), target, atol=1e-3)
    layer = r.layer[0]
    nearest = layer.nearest_codes()
    # ties aside (within 0.1 of a half step at the grid edges), the initial hard codes are nearest rounding
    frac = target - target.floor()
    clear = (frac - 0.5).abs() > 0.1
    assert torch.equal(r.hard_codes()[clear], nearest[clear])
    if offsets == (0, 1):
        assert torch.equal(r.hard_codes(), nearest)


@pytest.mark.parametrize("offsets", [(0, 1), WIDE])
def test_nearest_init_expectation_equals_nearest_rounding(offsets: tuple[int, ...]) -> None:
    r = _rounder(3, init="nearest", offsets=offsets)
    layer = r.layer[0]
    nearest = layer.nearest_codes() - layer.weight_quantizer.zero_point[:, None]
    # exact up to the 1e-4-of-the-range margin kept from the extreme candidates
    assert torch.allclose(r.soft_codes(), nearest, atol=1e-4 * (max(offsets) - min(offsets)) + 1e-5)
    assert torch.equal(r.hard_codes(), layer.nearest_codes())
    w_nearest = layer.dequantize_codes(layer.nearest_codes())
    assert torch.allclose(r(), w_nearest, atol=1e-3 * float(layer.weight_quantizer.scale.max()))


def test_gaussian_logits_hit_the_requested_mean_with_clipped_candidates() -> None:
    offsets = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    base = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 6.0])  # grid [0, 3]: the ends clip some candidates
    target = torch.tensor([0.3, 1.5, 2.25, 2.9, 3.0, 3.0])
    logits = gaussian_logits_with_mean(target, base, offsets, 0, 3, 0.5)
    values = torch.clamp(base[:, None] + offsets, 0, 3)
    mean = (torch.softmax(logits, -1) * values).sum(-1)
    assert torch.allclose(mean[:4], target[:4], atol=1e-5)
    assert mean[4] == pytest.approx(3.0, abs=1e-3)  # an extreme: 1e-4 of the range inside
    assert torch.isfinite(logits).all()  # base 6: every candidate clips to 3, any logits are fine


# --------------------------------------------------------------------------- annealing
def test_softmax_becomes_one_hot_as_the_temperature_anneals() -> None:
    r = _rounder(4, offsets=WIDE)
    with torch.no_grad():
        r.v.copy_(torch.randn(r.v.shape, generator=torch.Generator().manual_seed(0)))
    sharpness = []
    for p in torch.linspace(0, 1, 11).tolist():
        r.step(p)
        sharpness.append(r.sharpness())
    assert all(a <= b + 1e-7 for a, b in zip(sharpness, sharpness[1:]))
    assert sharpness[0] < 0.6 and sharpness[-1] > 0.99
    # at the final temperature the soft weight is the hard one wherever the top two logits are not tied
    top2 = r.v.detach().topk(2, dim=0).values
    decided = (top2[0] - top2[1]) > 0.1  # 10 temperatures apart at tau_end = 0.01
    hard = r.hard_codes() - r.layer[0].weight_quantizer.zero_point[:, None]
    assert decided.float().mean() > 0.8
    assert torch.allclose(r.soft_codes().detach()[decided], hard[decided], atol=1e-3)


def test_hard_codes_are_the_argmax_candidates() -> None:
    r = _rounder(4, offsets=WIDE)
    with torch.no_grad():
        r.v.zero_()
        r.v[3] = 1.0  # offset +2 everywhere, clipped at the top of the grid
    layer = r.layer[0]
    q, spec = layer.weight_quantizer, layer.weight_spec
    floor = torch.floor(layer.weight.detach() / q.scale[:, None])
    expected = torch.clamp(floor + 2 + q.zero_point[:, None], spec.qmin, spec.qmax)
    assert torch.equal(r.hard_codes(), expected)


# --------------------------------------------------------------------------- gradients
def test_analytic_gradient_matches_autograd_softmax() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    c = torch.randn(4, 5, 7, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda t: _SoftmaxExpectation.apply(t, c, 0.3), (v,))
    w = torch.randn(5, 7, dtype=torch.float64, generator=g)
    ours = torch.autograd.grad((_SoftmaxExpectation.apply(v, c, 0.3) * w).sum(), v)[0]
    ref = torch.autograd.grad(((torch.softmax(v / 0.3, 0) * c).sum(0) * w).sum(), v)[0]
    assert torch.allclose(ours, ref)


def test_two_candidate_shortcut_equals_the_softmax() -> None:
    r = _rounder(4)
    with torch.no_grad():
        r.v.copy_(torch.randn(r.v.shape, generator=torch.Generator().manual_seed(2)))
    r.step(0.3)
    fast = r.soft_codes()
    ref = (torch.softmax(r.v / r.tau, 0) * r.candidates).sum(0)
    assert torch.allclose(fast, ref, atol=1e-6)
    g = torch.randn(fast.shape, generator=torch.Generator().manual_seed(3))
    grad_fast = torch.autograd.grad((fast * g).sum(), r.v)[0]
    grad_ref = torch.autograd.grad((ref * g).sum(), r.v)[0]
    assert torch.allclose(grad_fast, grad_ref, atol=1e-5)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("options", [
    {"offsets": (-1, 0)}, {"offsets": (0, 0, 1)}, {"offsets": (0, 1.5)}, {"tau_start": 0.1, "tau_end": 1.0},
    {"tau_end": 0.0}, {"warmup": 1.0}, {"init": "random"}, {"init_spread": 0.0},
])
def test_bad_options_are_config_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        AnnealingSoftmaxRounding(AnnealingSoftmaxRounding.make_config(options))
