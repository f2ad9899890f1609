"""Cross-layer equalization: the scale formula, equal ranges at convergence, unchanged function, BN statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from quantplug_dfq.activations import ChannelClip
from quantplug_dfq.equalize import (
    EqualizePass,
    consumer_ranges,
    equalization_scales,
    per_tensor_precision,
    producer_ranges,
    scale_pair,
)
from torch import nn

from quantplug.config import Recipe
from quantplug.errors import ConfigError
from quantplug.interfaces import PassContext
from quantplug.testing.conformance import ModelPassConformance


def _ctx(model: nn.Module) -> PassContext:
    return PassContext(None, Recipe(), None, model, [], [], torch.device("cpu"), 0, "float")


def test_one_pair_gets_the_geometric_mean_range_and_keeps_the_function() -> None:
    torch.manual_seed(0)
    producer, consumer = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)
    with torch.no_grad():
        producer.weight.mul_(torch.logspace(-2, 1, 6).reshape(-1, 1, 1, 1))  # ranges over three decades
    x = torch.randn(8, 3, 5, 5)
    before = consumer(torch.relu(producer(x)))
    r1, r2 = producer_ranges(producer), consumer_ranges(consumer)
    s = equalization_scales(r1, r2)
    assert torch.allclose(s, torch.sqrt(r1 * r2) / r2)
    scale_pair(producer, consumer, s)
    target = torch.sqrt(r1 * r2)
    assert torch.allclose(producer_ranges(producer), target, rtol=1e-5)
    assert torch.allclose(consumer_ranges(consumer), target, rtol=1e-5)
    assert torch.allclose(consumer(torch.relu(producer(x))), before, rtol=1e-4, atol=1e-5)


def test_depthwise_consumer_and_dead_channels() -> None:
    torch.manual_seed(1)
    producer, depthwise = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
    with torch.no_grad():
        producer.weight[2].zero_()  # a dead channel keeps scale 1
    r2 = consumer_ranges(depthwise)
    assert torch.allclose(r2, depthwise.weight.abs().reshape(4, -1).amax(1))
    s = equalization_scales(producer_ranges(producer), r2)
    assert s[2] == 1.0 and (s > 0).all()


def test_pass_keeps_function_with_relu6_clip_and_reaches_a_fixed_point(tiny_mobilenet, images) -> None:  # type: ignore[no-untyped-def]
    model = tiny_mobilenet()
    reference = model(images)
    precision_before = per_tensor_precision(model.block1.conv[1][0])
    summary = EqualizePass().run(model, _ctx(model))
    assert summary["converged"] and summary["sweeps"] > 1  # chains need several sweeps
    assert len(summary["pairs"]) == 6  # the seven links minus the one into a residual block
    assert torch.allclose(model(images), reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())
    # ranges stopped changing: every pair has equal producer-output and consumer-input ranges
    for producer, consumer, _ in summary["pairs"]:
        r1 = producer_ranges(model.get_submodule(producer))
        r2 = consumer_ranges(model.get_submodule(consumer))
        assert torch.allclose(r1, r2, rtol=1e-4)
    assert per_tensor_precision(model.block1.conv[1][0]) > precision_before
    assert summary["precision_after"] > summary["precision_before"]
    assert isinstance(model.stem[2], ChannelClip) and not torch.allclose(model.stem[2].upper, torch.full((8,), 6.0))


def test_relu_mode_replaces_relu6_by_relu_and_skip_mode_leaves_it(tiny_mobilenet, images) -> None:  # type: ignore[no-untyped-def]
    model = tiny_mobilenet()
    as_relu = copy.deepcopy(model)
    for name, m in list(as_relu.named_modules()):
        if isinstance(m, nn.ReLU6):
            parent, _, child = name.rpartition(".")
            setattr(as_relu.get_submodule(parent), child, nn.ReLU())
    EqualizePass(EqualizePass.Config(relu6="relu")).run(model, _ctx(model))
    expected = as_relu(images)
    assert torch.allclose(model(images), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())

    untouched = tiny_mobilenet()
    summary = EqualizePass(EqualizePass.Config(relu6="skip")).run(untouched, _ctx(untouched))
    assert summary["pairs"] == []
    assert all("ReLU6" in s["reason"] or "other users" in s["reason"] for s in summary["skipped"])


def test_relu6_stays_when_every_scale_is_one() -> None:
    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(2, 2), nn.ReLU6(), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.act(self.fc1(x)))

    model = Mlp()
    with torch.no_grad():  # output ranges of fc1 = input ranges of fc2 = [1, 1/2]: s = 1 exactly
        model.fc1.weight.copy_(torch.tensor([[1.0, 0.5], [0.25, -0.5]]))
        model.fc2.weight.copy_(torch.tensor([[1.0, 0.5], [-0.5, 0.25]]))
    summary = EqualizePass().run(model, _ctx(model))
    assert summary["pairs"] == [["fc1", "fc2", "relu6"]] and summary["sweeps"] == 1
    assert isinstance(model.act, nn.ReLU6) and summary["replaced_activations"] == 0
    assert summary["channel_clips"] == {}


def test_bn_statistics_follow_the_scales(tiny_mobilenet) -> None:  # type: ignore[no-untyped-def]
    model = tiny_mobilenet()
    name = "block1.conv.1.0"
    before = {k: v.clone() for k, v in model.quantplug_bn_stats[name].items() if isinstance(v, torch.Tensor)}
    bias_before = model.get_submodule(name).bias.detach().clone()
    EqualizePass().run(model, _ctx(model))
    ratio = bias_before / model.get_submodule(name).bias.detach()  # the folded output was divided by s
    after = model.quantplug_bn_stats[name]
    assert torch.allclose(after["weight"], before["weight"] / ratio, rtol=1e-4)
    assert torch.allclose(after["bias"], before["bias"] / ratio, rtol=1e-4)


def test_bad_options_are_clear() -> None:
    with pytest.raises(ConfigError, match="relu6"):
        EqualizePass(EqualizePass.Config(relu6="gelu"))
    with pytest.raises(ConfigError):
        EqualizePass.make_config({"sweeps": 3})


class TestEqualizeConformance(ModelPassConformance):
    component = EqualizePass
