"""Which pairs may be scaled or shifted: a layer called twice, a consumer reading two inputs, shared weights,
and an untraceable model whose forward reads an intermediate output of its nn.Sequential. Equalization must
keep the network's function on all of them (the full-precision reference is copied after it)."""

from __future__ import annotations

import pytest
import torch
from quantplug_dfq.absorb import AbsorbBiasPass
from quantplug_dfq.equalize import EqualizePass
from quantplug_dfq.graph import CHANGED_OUTPUT, find_links
from torch import nn

from quantplug.bn_fold import fold_batchnorm
from quantplug.config import Recipe
from quantplug.interfaces import PassContext


class SharedProducer(nn.Module):
    """One convolution called twice (weight sharing): ``b(relu(a(x))) + c(relu(a(2 x)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + self.c(torch.relu(self.a(x * 2)))


class SharedConsumer(nn.Module):
    """A consumer that also reads the model's input: ``b(relu(a(x))) + b(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + self.b(x)


class TiedWeights(nn.Module):
    """``b`` and ``c`` share one weight tensor: scaling ``b``'s inputs would scale ``c``'s too."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.c.weight = self.b.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + self.c(x)


class TapUntraceable(nn.Module):
    """Untraceable (data-dependent branch); the forward adds the output of the first ReLU to the result."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout)] if batchnorm else [nn.Conv2d(cin, cout, 1)]

        self.features = nn.Sequential(*block(3, 6), nn.ReLU(), *block(6, 6), nn.ReLU(), nn.Conv2d(6, 6, 1))
        self.tap = 2 if batchnorm else 1  # index of the first ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e30:  # never true; fx cannot evaluate it symbolically
            return x
        tapped = x
        for i, module in enumerate(self.features):
            x = module(x)
            if i == self.tap:
                tapped = x
        return x + tapped


def _spread(model: nn.Module) -> None:
    """Output channel ranges over 2.5 decades, so equalization has large scales to apply."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.logspace(-1.5, 1, m.weight.shape[0]).reshape(-1, *[1] * (m.weight.dim() - 1)))


def _ctx(model: nn.Module, inputs: torch.Tensor | None) -> PassContext:
    calib = [inputs] if inputs is not None else []
    return PassContext(None, Recipe(), None, model, calib, [None] * len(calib), torch.device("cpu"), 0, "float")


CASES = {
    "producer-called-twice": (SharedProducer, 4, "producer is called more than once"),
    "consumer-called-twice": (SharedConsumer, 4, "consumer is called more than once"),
    "tied-weights": (TiedWeights, 4, "weights are shared"),
    "untraceable-tap": (TapUntraceable, 3, CHANGED_OUTPUT),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equalization_keeps_the_function_when_tensors_or_layers_are_shared(case: str) -> None:
    cls, channels, reason = CASES[case]
    torch.manual_seed(0)
    model = cls().eval()
    _spread(model)
    x = torch.randn(8, channels, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
        summary = EqualizePass().run(model, _ctx(model, x[:4]))  # verified on a calibration batch
        change = float((model(x) - reference).abs().max() / reference.abs().max())
    assert change < 1e-6  # before these checks: 0.048, 0.17, 0.31 (tied) and 0.22
    assert summary["skipped"] and all(reason in s["reason"] for s in summary["skipped"])
    if case == "untraceable-tap":  # the second pair is not tapped: it is verified and equalized
        assert summary["pairs"] == [["features.2", "features.4", "relu"]]
    else:
        assert summary["pairs"] == []


def test_absorption_skips_a_tapped_pair_of_an_untraceable_model() -> None:
    torch.manual_seed(0)
    model = TapUntraceable(batchnorm=True).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(0.5)
                m.bias.fill_(4.0)  # c = 4 - 3 * 0.5 = 2.5 on every channel
    model = fold_batchnorm(model)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    links = {(lk.producer, lk.consumer): lk for lk in find_links(model, lambda m: m(x))}
    assert not links[("features.0", "features.3")].exclusive and links[("features.3", "features.6")].exclusive
    tapped_bias = model.features[0].bias.detach().clone()
    summary = AbsorbBiasPass().run(model, _ctx(model, x))
    assert [(r["producer"], r["consumer"], r["channels"]) for r in summary["absorbed"]] == [
        ("features.3", "features.6", 6)]
    assert summary["skipped"][0]["reason"] == CHANGED_OUTPUT
    assert torch.equal(model.features[0].bias, tapped_bias)  # the tapped producer is untouched
