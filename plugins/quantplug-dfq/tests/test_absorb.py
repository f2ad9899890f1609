"""Bias absorption: c = max(0, beta - 3 gamma), exact when the pre-activation stays above c, ReLU6 thresholds."""

from __future__ import annotations

import pytest
import torch
from quantplug_dfq.absorb import AbsorbBiasPass, absorbable_shift
from quantplug_dfq.activations import ChannelClip
from quantplug_dfq.equalize import EqualizePass
from torch import nn

from quantplug.bn_fold import fold_batchnorm
from quantplug.config import Recipe
from quantplug.errors import ConfigError
from quantplug.interfaces import PassContext
from quantplug.testing.conformance import ModelPassConformance

GAMMA = torch.tensor([0.5, 1.0, 0.2, 2.0])
BETA = torch.tensor([5.0, 1.0, 2.0, -1.0])


class Pair(nn.Module):
    """identity 1x1 conv -> BN(gamma, beta) -> activation -> 1x1 (or padded 3x3) conv."""

    def __init__(self, act: nn.Module, padded: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=0.0)
        self.act = act
        self.b = nn.Conv2d(4, 3, 3, padding=1) if padded else nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(4).reshape(4, 4, 1, 1))
            self.bn.weight.copy_(GAMMA)
            self.bn.bias.copy_(BETA)  # running mean 0, var 1: the pre-activation is gamma * x + beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.bn(self.a(x))))


def _folded(act: nn.Module, padded: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return fold_batchnorm(Pair(act, padded).eval())


def _ctx(model: nn.Module) -> PassContext:
    return PassContext(None, Recipe(), None, model, [], [], torch.device("cpu"), 0, "float")


def _inputs() -> torch.Tensor:
    # standard normal inputs within 2.9 standard deviations: the pre-activation never falls below c
    return torch.randn(64, 4, 6, 6, generator=torch.Generator().manual_seed(1)).clamp(-2.9, 2.9)


def test_shift_is_beta_minus_three_gamma_clipped_at_zero() -> None:
    assert torch.allclose(absorbable_shift(BETA, GAMMA, 3.0), torch.tensor([3.5, 0.0, 1.4, 0.0]))
    assert torch.allclose(absorbable_shift(BETA, GAMMA, 3.0, torch.tensor([2.0, 6.0, 6.0, 6.0])),
                          torch.tensor([2.0, 0.0, 1.4, 0.0]))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6()], ids=["relu", "relu6"])
def test_absorption_keeps_the_function_and_shrinks_the_activation(act: nn.Module) -> None:
    model = _folded(act)
    x = _inputs()
    before = model(x)
    activation_before = model.act(model.bn(model.a(x)))
    bias_b = model.b.bias.detach().clone()
    summary = AbsorbBiasPass().run(model, _ctx(model))
    assert [(r["producer"], r["consumer"], r["channels"]) for r in summary["absorbed"]] == [("a", "b", 2)]
    c = torch.tensor([3.5, 0.0, 1.4, 0.0])
    assert torch.allclose(model.a.bias, BETA - c)
    expected_b = bias_b + (model.b.weight.reshape(3, 4) * c).sum(1)
    assert torch.allclose(model.b.bias, expected_b, atol=1e-6)
    assert torch.allclose(model(x), before, atol=1e-5)
    activation_after = model.act(model.bn(model.a(x)))
    assert torch.allclose(activation_after, activation_before - c.reshape(1, 4, 1, 1), atol=1e-5)
    assert torch.allclose(model.quantplug_bn_stats["a"]["bias"], BETA - c)
    if isinstance(act, nn.ReLU6):
        assert isinstance(model.act, ChannelClip)
        assert torch.allclose(model.act.upper, torch.tensor([2.5, 6.0, 4.6, 6.0]))


def test_values_below_c_are_the_only_change() -> None:
    model = _folded(nn.ReLU())
    x = torch.zeros(1, 4, 1, 1)
    x[0, 0] = -4.0  # pre-activation 5 - 2 = 3 < c = 3.5: ReLU(3 - 3.5) + 3.5 = 3.5 instead of 3
    before = model(x)
    AbsorbBiasPass().run(model, _ctx(model))
    after = model(x)
    assert torch.allclose((after - before).flatten(), model.b.weight[:, 0, 0, 0] * 0.5, atol=1e-5)


def test_padded_consumer_is_skipped() -> None:
    model = _folded(nn.ReLU(), padded=True)
    bias = model.a.bias.detach().clone()
    summary = AbsorbBiasPass().run(model, _ctx(model))
    assert summary["absorbed"] == [] and "pads" in summary["skipped"][0]["reason"]
    assert torch.equal(model.a.bias, bias)


def test_relu6_stays_where_nothing_is_absorbed() -> None:
    pair = Pair(nn.ReLU6()).eval()
    with torch.no_grad():
        pair.bn.bias.fill_(0.5)  # beta - 3 gamma = 0.5 - 3 * [0.5, 1, 0.2, 2] < 0: c = 0 on every channel
    model = fold_batchnorm(pair)
    x = _inputs()
    before = model(x)
    summary = AbsorbBiasPass().run(model, _ctx(model))
    assert summary["absorbed"] == [] and "nothing to absorb" in summary["skipped"][0]["reason"]
    assert isinstance(model.act, nn.ReLU6) and summary["channel_clips"] == {}
    assert torch.equal(model(x), before)


def test_only_pairs_with_something_to_absorb_get_a_channel_clip(tiny_mobilenet) -> None:  # type: ignore[no-untyped-def]
    model = tiny_mobilenet()
    EqualizePass(EqualizePass.Config(relu6="skip")).run(model, _ctx(model))
    assert not any(isinstance(m, ChannelClip) for m in model.modules())
    summary = AbsorbBiasPass().run(model, _ctx(model))
    nothing = [s for s in summary["skipped"] if "nothing to absorb" in s["reason"]]
    assert summary["absorbed"] and nothing  # both kinds occur in this model
    assert all(r["channels"] > 0 for r in summary["absorbed"])
    clipped = {n for n, m in model.named_modules() if isinstance(m, ChannelClip)}
    assert set(summary["channel_clips"]) == clipped
    # every pair here has a ReLU6: one clip per pair that absorbed something, none elsewhere
    assert len(clipped) == len(summary["absorbed"])
    assert isinstance(model.get_submodule(nothing[0]["producer"].rsplit(".", 1)[0] + ".2"), nn.ReLU6)


def test_negative_num_std_is_rejected() -> None:
    with pytest.raises(ConfigError):
        AbsorbBiasPass(AbsorbBiasPass.Config(num_std=-1.0))


class TestAbsorbConformance(ModelPassConformance):
    component = AbsorbBiasPass
