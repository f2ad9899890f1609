"""Small models with the structures DFQ cares about: ReLU6 chains with a depthwise conv, a residual, a head."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import nn

from quantplug.bn_fold import fold_batchnorm
from quantplug.builtins.testing_models import TinyModelAdapter
from quantplug.interfaces import UnitSpec
from quantplug.modules import quantizable_layers
from quantplug.plugins import Session


def conv_bn_act(cin: int, cout: int, k: int, groups: int = 1, act: type[nn.Module] | None = nn.ReLU6) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU6 -> project 1x1 (+ input)."""

    def __init__(self, cin: int, cout: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = cin == cout
        self.conv = nn.Sequential(conv_bn_act(cin, hidden, 1), conv_bn_act(hidden, hidden, 3, groups=hidden),
                                  conv_bn_act(hidden, cout, 1, act=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class TinyMobileNet(nn.Module):
    """stem -> block (no residual) -> block (residual) -> 1x1 conv + ReLU6 -> pool -> flatten -> dropout -> fc."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = conv_bn_act(3, 8, 3)
        self.block1 = InvertedResidual(8, 12)
        self.block2 = InvertedResidual(12, 12)
        self.last = conv_bn_act(12, 24, 1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.block2(self.block1(self.stem(x))))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Untraceable(TinyMobileNet):
    """The same network with data-dependent control flow, which torch.fx cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e30:  # never true; fx cannot evaluate it symbolically
            return x
        return super().forward(x)


def randomize_bn(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm unequal statistics and affine terms so equalization has work to do."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                m.weight.copy_(torch.rand(n, generator=gen) * 3 + 0.05)  # very different channel ranges
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5 + 0.5)


def build(cls: type[nn.Module] = TinyMobileNet, seed: int = 0, fold: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    model = cls().eval()
    randomize_bn(model, seed)
    return fold_batchnorm(model) if fold else model


@pytest.fixture
def tiny_mobilenet() -> Callable[..., nn.Module]:
    """Factory: ``tiny_mobilenet(seed=0, fold=True, untraceable=False)``."""

    def make(seed: int = 0, fold: bool = True, untraceable: bool = False) -> nn.Module:
        return build(Untraceable if untraceable else TinyMobileNet, seed, fold)

    return make


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(5))


class TinyMobileNetAdapter(TinyModelAdapter):
    """``dfq-test:tiny-mobilenet``: the ReLU6 network above (seed 0, BN not folded) on ``synthetic:images``,
    one block, so ``apply`` and ``load`` can run it like a real model id."""

    name = "dfq-test"
    prefixes = ("dfq-test",)
    default_model = None

    def load(self, model_id: str, *, device: torch.device, options: Mapping[str, Any] | None = None) -> nn.Module:
        return build(seed=0, fold=False).to(device)

    def default_data(self, model_id: str) -> str | None:
        return "synthetic:images"

    def blocks(self, model: nn.Module) -> list[UnitSpec]:
        return [UnitSpec("model", ("",), tuple(quantizable_layers(model)))]


@pytest.fixture
def mobilenet_session() -> Session:
    """A session that also knows ``dfq-test:tiny-mobilenet``."""
    session = Session()
    session.model_adapters.register(TinyMobileNetAdapter, "dfq-tests")
    return session
