"""Small models and a minimal adapter for the plugin's tests."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from quantplug.config import BitPolicy, PerChannel, QuantSpec, Recipe
from quantplug.interfaces import ModelAdapter, PassContext
from quantplug.plugins import Session
from quantplug.prepare import prepare_model


class ToyAdapter(ModelAdapter):
    """Tensor in, logits out, cross entropy; every Conv2d / Linear quantizable."""

    name = "toy"


class TwoBranch(nn.Module):
    """``y = A x + gain * B x`` with ``A == B``: B's Hessian block is ``gain^2`` times A's, their errors equal."""

    def __init__(self, gain: float = 4.0, features: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.a = nn.Linear(features, classes, bias=False)
        self.b = nn.Linear(features, classes, bias=False)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.gain * self.b(x)


class SmallMLP(nn.Module):
    def __init__(self, features: int = 6, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class DepthwiseNet(nn.Module):
    """Stem, depthwise 3x3, pointwise 1x1, head: a MobileNet block in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 32, 1)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def labelled_batches(model: nn.Module, inputs: torch.Tensor, batch: int,
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split ``inputs`` into batches labelled by the model's own prediction (a trained-model stand-in)."""
    with torch.no_grad():
        targets = model(inputs).argmax(-1)
    xs = list(inputs.split(batch))
    ys = list(targets.split(batch))
    return xs, ys


def toy_recipe(bits: int = 3, fixed_ends: bool = False) -> Recipe:
    policy = BitPolicy() if fixed_ends else BitPolicy(first_layer_bits=None, last_layer_bits=None)
    return Recipe(weight=QuantSpec(bits, False, PerChannel(0)), activation=None, bits=policy)


def pass_context(model: nn.Module, inputs: torch.Tensor, recipe: Recipe, batch: int = 16,
                 ) -> tuple[nn.Module, PassContext]:
    """(prepared copy of ``model``, a ``prepared``-stage context with ``model`` as the full-precision reference)."""
    adapter = ToyAdapter()
    fp_model = model.eval()
    q_model = copy.deepcopy(fp_model)
    prepare_model(q_model, adapter, recipe)
    xs, ys = labelled_batches(fp_model, inputs, batch)
    ctx = PassContext(Session(entry_points=False), recipe, adapter, fp_model, xs, ys, torch.device("cpu"), 0,
                      "prepared")
    return q_model, ctx


def run_pass(model: nn.Module, inputs: torch.Tensor, recipe: Recipe, **options: Any) -> tuple[nn.Module, dict]:
    from quantplug_mixed import MixedPrecisionPass

    q_model, ctx = pass_context(model, inputs, recipe)
    summary = MixedPrecisionPass(MixedPrecisionPass.make_config(options)).run(q_model, ctx)
    return q_model, summary
