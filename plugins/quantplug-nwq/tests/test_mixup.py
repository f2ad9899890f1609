"""Annealing mixup: the schedule of p(t), the element-wise mixing it produces, determinism, restoration."""

from __future__ import annotations

import pytest
import torch
from quantplug_nwq import AnnealingMixupPolicy, fp_probability_at

from quantplug.config import QuantSpec
from quantplug.errors import ConfigError
from quantplug.quantizer import AffineQuantizer

torch.set_num_threads(1)


def _quantizer() -> AffineQuantizer:
    q = AffineQuantizer(QuantSpec(2, False))
    q.set_qparams(torch.tensor([1.0]), torch.tensor([0.0]))
    return q


def _off_grid(n: int = 200_000) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(0)) * 3 + 0.25  # never on the grid {0..3}


def test_schedule_linear_and_cosine() -> None:
    assert fp_probability_at(0.0, 0.5, 0.8) == 0.5
    assert fp_probability_at(0.4, 0.5, 0.8) == pytest.approx(0.25)
    assert fp_probability_at(0.8, 0.5, 0.8) == 0.0
    assert fp_probability_at(0.95, 0.5, 0.8) == 0.0
    assert fp_probability_at(0.4, 0.5, 0.8, "cosine") == pytest.approx(0.25)  # half-way down a half cosine
    assert fp_probability_at(0.2, 0.5, 0.8, "cosine") == pytest.approx(0.25 * (1 + 2**-0.5))
    values = [fp_probability_at(p / 50, 0.6, 1.0, "cosine") for p in range(51)]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == 0.0


@pytest.mark.parametrize("progress", [0.0, 0.3, 0.6, 0.9])
def test_fraction_of_full_precision_elements_follows_the_schedule(progress: float) -> None:
    q = _quantizer()
    policy = AnnealingMixupPolicy()
    policy.begin([q], torch.Generator().manual_seed(0))
    policy.step(progress)
    expected = fp_probability_at(progress, 0.5, 0.8)
    assert policy.fp_prob == pytest.approx(expected)
    x = _off_grid()
    out = q(x)
    kept = out == x
    quantized = out == torch.round(x).clamp(0, 3)
    assert torch.equal(kept | quantized, torch.ones_like(kept))  # every element is x or x_q, nothing else
    assert abs(kept.float().mean().item() - expected) < 0.01


def test_end_restores_plain_quantization_and_resets_the_schedule() -> None:
    q = _quantizer()
    policy = AnnealingMixupPolicy()
    policy.begin([q], torch.Generator().manual_seed(0))
    policy.step(0.5)
    policy.end([q])
    x = _off_grid(1000)
    assert q.mixer is None and torch.equal(q(x), torch.round(x).clamp(0, 3))
    assert policy.fp_prob == 0.5


def test_same_generator_same_masks_and_full_precision_at_p1() -> None:
    outs = []
    for _ in range(2):
        q = _quantizer()
        policy = AnnealingMixupPolicy()
        policy.begin([q], torch.Generator().manual_seed(7))
        outs.append(q(_off_grid(1000)))
    assert torch.equal(outs[0], outs[1])
    q = _quantizer()
    policy = AnnealingMixupPolicy(AnnealingMixupPolicy.make_config({"start_fp_prob": 1.0}))
    policy.begin([q])
    x = _off_grid(1000)
    assert torch.equal(q(x), x)


@pytest.mark.parametrize("options", [{"start_fp_prob": 1.5}, {"end_progress": 0.0}, {"schedule": "step"}])
def test_bad_options_are_config_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        AnnealingMixupPolicy(AnnealingMixupPolicy.make_config(options))
