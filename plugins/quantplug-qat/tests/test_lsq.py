"""The straight-through weight and LSQ step maths: start at the PTQ codes, STE and step gradients, grad scale."""

from __future__ import annotations

import math

import pytest
import torch
from quantplug_qat.lsq import ActivationSteps, LSQWeight, lsq_factor
from torch import nn

from quantplug.config import PerChannel, PerTensor, QuantSpec
from quantplug.modules import QuantLinear
from quantplug.quantizer import AffineQuantizer, qparams_from_range, to_rows


def _layer(bits: int = 2, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    layer = QuantLinear(nn.Linear(8, 4), QuantSpec(bits, False, PerChannel(0)), None)
    rows = to_rows(layer.weight.detach(), layer.weight_spec)
    lo, hi = rows.min(1).values, rows.max(1).values
    layer.weight_quantizer.set_qparams(*qparams_from_range(0.8 * lo, 0.8 * hi, layer.weight_spec))  # some clipping
    codes = layer.nearest_codes()
    codes[0, 0] = (codes[0, 0] + 1) % 4  # a code no nearest rounding would give: QAT must start from it
    layer.set_codes(codes)
    return layer


def test_lsq_factor() -> None:
    assert lsq_factor(100, 15) == pytest.approx(1 / math.sqrt(1500))


def test_starts_exactly_at_the_ptq_codes() -> None:
    layer = _layer()
    codes = layer.weight_codes.clone()
    rounder = LSQWeight(layer, "codes")
    # equal up to float rounding (LSQ's gradient scaling computes s as (s - g s) + g s)
    assert torch.allclose(rounder(), layer.dequantize_codes(codes), rtol=1e-6, atol=0)
    assert torch.equal(rounder.hard_codes().to(codes.dtype), codes)
    from_float = LSQWeight(_layer(), "float")
    assert torch.equal(from_float.latent, _layer().weight)


def test_ste_and_lsq_step_gradients() -> None:
    layer = _layer(bits=3)
    rounder = LSQWeight(layer, "float")
    spec = layer.weight_spec
    w, s = rounder.latent.detach(), rounder.weight_step.detach()[:, None]
    z = rounder.zero_point[:, None]
    v = w / s
    codes = torch.round(v) + z
    inside = (codes >= spec.qmin) & (codes <= spec.qmax)  # a weight rounded to an edge code is not clipped
    rounder().sum().backward()
    # straight-through: gradient 1 inside the grid (edge codes included), 0 where the weight is clipped
    assert torch.equal(rounder.latent.grad, inside.float())
    edge = (codes == spec.qmin) | (codes == spec.qmax)
    assert (~inside).any() and edge.any() and (inside & ~edge).any()
    # LSQ: d w_q / d s = round(v) - v inside, the clipped level (code - z) outside, times 1/sqrt(N Q_P)
    centered = codes.clamp(spec.qmin, spec.qmax) - z
    expected = torch.where(inside, centered - v, centered).sum(1) * lsq_factor(w.shape[1], spec.qmax)
    assert torch.allclose(rounder.weight_step.grad, expected, atol=1e-5)


def test_activation_step_gradient_uses_per_sample_features() -> None:
    spec = QuantSpec(4, False, PerTensor())
    x = torch.rand(5, 3, 7) * 4
    grads = []
    for scaled in (False, True):
        q = AffineQuantizer(spec)
        q.set_qparams(torch.tensor([0.2]), torch.tensor([0.0]))
        steps = ActivationSteps([q]) if scaled else None
        step = q.scale if scaled else q.make_step_learnable()
        q(x).sum().backward()
        grads.append(step.grad.clone())
        if steps is not None:
            steps.freeze()
            assert not isinstance(q.scale, nn.Parameter)
    assert torch.allclose(grads[1], grads[0] * lsq_factor(3 * 7, spec.qmax))


def test_hard_codes_follow_the_learned_step() -> None:
    layer = _layer(bits=4)
    rounder = LSQWeight(layer, "codes")
    with torch.no_grad():
        rounder.weight_step.mul_(0.5)
        rounder.latent.add_(0.01)
    step, zero_point = rounder.final_qparams()
    expected = torch.clamp(torch.round(rounder.latent / step[:, None]) + zero_point[:, None], 0, 15)
    assert torch.equal(rounder.hard_codes(), expected)
