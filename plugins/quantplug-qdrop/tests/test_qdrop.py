"""QDrop: the drop policy's statistics, input mixing, determinism, restoration; the recipe."""

from __future__ import annotations

import pytest
import torch
from quantplug_qdrop import DropPolicy

from quantplug.config import QuantSpec
from quantplug.errors import ConfigError
from quantplug.plugins import Session
from quantplug.quantizer import AffineQuantizer
from quantplug.recipes import resolve_recipe
from quantplug.testing.conformance import RecipeSmoke


def _quantizer() -> AffineQuantizer:
    q = AffineQuantizer(QuantSpec(2, False))
    q.set_qparams(torch.tensor([1.0]), torch.tensor([0.0]))
    return q


def test_drop_quantizes_about_prob_of_elements_and_keeps_the_rest() -> None:
    q = _quantizer()
    policy = DropPolicy(DropPolicy.make_config({"prob": 0.3}))
    policy.begin([q], torch.Generator().manual_seed(0))
    x = torch.rand(200_000) * 3 + 0.25  # never on the grid
    out = q(x)
    quantized = out == torch.round(x).clamp(0, 3)
    assert abs(quantized.float().mean().item() - 0.3) < 0.01
    assert torch.equal(out[~quantized], x[~quantized])
    policy.end([q])
    assert q.mixer is None and q.selector is None and torch.equal(q(x), torch.round(x).clamp(0, 3))


def test_unit_input_mixes_quantized_with_full_precision_input() -> None:
    q = _quantizer()
    policy = DropPolicy()
    policy.begin([q], torch.Generator().manual_seed(1))
    x_q, x_fp = torch.full((10_000,), 1.3), torch.full((10_000,), 2.7)
    mixed = policy.mix_unit_input(x_q, x_fp)
    out = q(mixed)
    assert torch.equal(out.unique(), torch.tensor([1.0, 2.7]))  # q(x_q) or the fp value, never x_q itself
    assert abs((out == 1.0).float().mean().item() - 0.5) < 0.02
    inner = q(torch.full((100,), 1.3))  # any other tensor falls back to its own value
    assert torch.equal(inner.unique(), torch.tensor([1.0, 1.3]))


def test_the_unit_input_is_mixed_once_for_every_consumer() -> None:
    """As released (``cur_inp = where(rand < p, cur_quant_inp, cur_fp_inp)``): the shortcut, a LayerNorm or a
    pooling that reads the unit input sees the mix, and two quantizers reading it use the same mask."""
    q1, q2 = _quantizer(), _quantizer()
    policy = DropPolicy()
    policy.begin([q1, q2], torch.Generator().manual_seed(4))
    x_q, x_fp = torch.full((10_000,), 1.3), torch.full((10_000,), 2.7)
    mixed = policy.mix_unit_input(x_q, x_fp)
    from_quantized = mixed == 1.3
    assert torch.equal(mixed.unique(), torch.tensor([1.3, 2.7]))  # a non-quantizer consumer gets the mix
    assert abs(from_quantized.float().mean().item() - 0.5) < 0.02
    out1, out2 = q1(mixed), q2(mixed)
    assert torch.equal(out1, out2)  # one mask: conv1 and the downsample agree
    assert torch.equal(out1 == 1.0, from_quantized)  # the quantized-model elements are the quantized ones
    assert torch.equal(out1[~from_quantized], x_fp[~from_quantized])


def test_entry_in_full_quantizes_the_unit_input_and_keeps_the_drop_inside() -> None:
    q = _quantizer()
    policy = DropPolicy()
    assert policy.controls_unit_entry
    policy.begin([q], torch.Generator().manual_seed(2))
    x_q, x_fp = torch.full((10_000,), 1.3), torch.full((10_000,), 2.7)
    mixed = policy.mix_unit_input(x_q, x_fp)
    policy.quantize_unit_entry(True)
    assert torch.equal(q(x_q).unique(), torch.tensor([1.0]))  # every element of the unit input quantized
    inner = q(torch.full((10_000,), 1.3))
    assert torch.equal(inner.unique(), torch.tensor([1.0, 1.3]))  # inside the unit: still dropped
    assert abs((inner == 1.0).float().mean().item() - 0.5) < 0.02
    policy.quantize_unit_entry(False)
    assert torch.equal(q(mixed).unique(), torch.tensor([1.0, 2.7]))  # back to mixing with the fp input
    policy.quantize_unit_entry(True)
    policy.end([q])
    assert not policy._entry_in_full


def test_weight_only_runs_mix_the_unit_input_only_when_asked() -> None:
    x_q, x_fp = torch.full((10_000,), 1.3), torch.full((10_000,), 2.7)
    plain = DropPolicy()
    plain.begin([], torch.Generator().manual_seed(3))
    assert plain.mix_unit_input(x_q, x_fp) is x_q  # the default: no quantizer, no mixing
    mixing = DropPolicy(DropPolicy.make_config({"mix_weight_only_inputs": True}))
    mixing.begin([], torch.Generator().manual_seed(3))
    mixed = mixing.mix_unit_input(x_q, x_fp)
    assert torch.equal(mixed.unique(), torch.tensor([1.3, 2.7]))
    assert abs((mixed == 1.3).float().mean().item() - 0.5) < 0.02
    with_quantizer = DropPolicy(DropPolicy.make_config({"mix_weight_only_inputs": True}))
    with_quantizer.begin([_quantizer()], torch.Generator().manual_seed(3))
    with_mixed = with_quantizer.mix_unit_input(x_q, x_fp)  # activations quantized: mixed whatever the option
    assert torch.equal(with_mixed.unique(), torch.tensor([1.3, 2.7]))
    unmixed = DropPolicy(DropPolicy.make_config({"input_mixing": False}))
    unmixed.begin([_quantizer()], torch.Generator().manual_seed(3))
    assert unmixed.mix_unit_input(x_q, x_fp) is x_q


def test_same_generator_same_masks() -> None:
    outs = []
    for _ in range(2):
        q = _quantizer()
        p = DropPolicy()
        p.begin([q], torch.Generator().manual_seed(7))
        outs.append(q(torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 3))
    assert torch.equal(outs[0], outs[1])


def test_prob_validation() -> None:
    with pytest.raises(ConfigError):
        DropPolicy(DropPolicy.make_config({"prob": 1.5}))


def test_qdrop_recipe_is_brecq_plus_drop() -> None:
    s = Session()
    r = resolve_recipe(s, "qdrop")
    assert (r.rounding.name, r.scheduler.name, r.loss.name) == ("adaround", "block", "mse")
    assert r.activation_policy.name == "drop" and r.activation_policy.options["prob"] == 0.5
    assert r.recon.order == "joint" and r.recon.learn_act_step and r.recon.act_lr == 4e-5


class TestQDropRecipe(RecipeSmoke):
    recipe = "qdrop"
