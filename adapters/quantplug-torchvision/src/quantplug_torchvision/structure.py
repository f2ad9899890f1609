"""Block structure of torchvision classifiers: the chain of blocks the reconstruction engine walks.

Each family lists its blocks so that running them one after another equals the model's forward pass:
a stem, the residual / inverted-residual blocks in order (each tagged with its stage), and a head that
includes the pooling and flattening the model does functionally. Models of no known family get a
generic structure: every top-level child holding Conv2d / Linear layers (containers are opened), which
supports layer- and block-wise reconstruction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantplug.interfaces import UnitSpec

QUANT_TYPES = (nn.Conv2d, nn.Linear)


def layers_in(model: nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for prefix in names:
        module = model.get_submodule(prefix)
        for sub, m in module.named_modules():
            if isinstance(m, QUANT_TYPES) or type(m).__name__ in ("QuantConv2d", "QuantLinear"):
                out.append(f"{prefix}.{sub}" if sub else prefix)
    return tuple(out)


def _spec(model: nn.Module, name: str, modules: tuple[str, ...], stage: str) -> UnitSpec:
    return UnitSpec(name, modules, layers_in(model, modules), stage=stage)


class PoolFlatten(nn.Module):
    """Global average pooling + flatten, as torchvision models do it functionally before the classifier."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


# -------------------------------------------------------------------------------- families
def resnet_blocks(model: nn.Module) -> list[UnitSpec]:
    blocks = [_spec(model, "stem", ("conv1", "bn1", "relu", "maxpool"), "stem")]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, _ in enumerate(getattr(model, stage)):
            blocks.append(_spec(model, f"{stage}.{i}", (f"{stage}.{i}",), stage))
    blocks.append(_spec(model, "head", ("avgpool", "fc"), "head"))
    return blocks


def mobilenet_v2_blocks(model: nn.Module) -> list[UnitSpec]:
    features = model.features  # type: ignore[attr-defined]
    n = len(features)
    blocks = [_spec(model, "stem", ("features.0",), "stem")]
    for i in range(1, n - 1):
        blocks.append(_spec(model, f"features.{i}", (f"features.{i}",), _mbv2_stage(features[i])))
    blocks.append(_spec(model, "head", (f"features.{n - 1}", "classifier"), "head"))
    return blocks


def _mbv2_stage(block: nn.Module) -> str:
    out = getattr(block, "out_channels", None)
    return f"c{out}" if out is not None else "features"


def regnet_blocks(model: nn.Module) -> list[UnitSpec]:
    blocks = [_spec(model, "stem", ("stem",), "stem")]
    for stage_name, stage in model.trunk_output.named_children():  # type: ignore[attr-defined]
        for block_name, _ in stage.named_children():
            name = f"trunk_output.{stage_name}.{block_name}"
            blocks.append(_spec(model, name, (name,), stage_name))
    blocks.append(_spec(model, "head", ("avgpool", "fc"), "head"))
    return blocks


def mnasnet_blocks(model: nn.Module) -> list[UnitSpec]:
    layers = model.layers  # type: ignore[attr-defined]
    stem = tuple(f"layers.{i}" for i in range(8))
    blocks = [_spec(model, "stem", stem, "stem")]
    for i in range(8, 14):
        for j, _ in enumerate(layers[i]):
            name = f"layers.{i}.{j}"
            blocks.append(_spec(model, name, (name,), f"layers.{i}"))
    tail = tuple(f"layers.{i}" for i in range(14, len(layers)))
    blocks.append(_spec(model, "head", (*tail, "classifier"), "head"))
    return blocks


def generic_blocks(model: nn.Module) -> list[UnitSpec]:
    """Top-level children with quantizable layers, opening Sequential / ModuleList containers."""
    blocks: list[UnitSpec] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if not layers_in(model, (full,)):
                continue
            if isinstance(child, (nn.Sequential, nn.ModuleList)) and not isinstance(child, QUANT_TYPES):
                visit(full, child)
            else:
                blocks.append(_spec(model, full, (full,), prefix or "model"))

    visit("", model)
    if not blocks and isinstance(model, QUANT_TYPES):
        raise ValueError("the model is a single layer; wrap it in an nn.Module")
    return blocks


FAMILIES: dict[str, Callable[[nn.Module], list[UnitSpec]]] = {
    "ResNet": resnet_blocks,
    "MobileNetV2": mobilenet_v2_blocks,
    "RegNet": regnet_blocks,
    "MNASNet": mnasnet_blocks,
}


def family_of(model: nn.Module) -> str | None:
    return type(model).__name__ if type(model).__name__ in FAMILIES else None


def blocks_of(model: nn.Module) -> list[UnitSpec]:
    family = family_of(model)
    return FAMILIES[family](model) if family else generic_blocks(model)


def head_module(model: nn.Module, block: UnitSpec) -> nn.Module:
    """The executable head: the model's functional pooling / flattening inserted where torchvision has it."""
    family = family_of(model)
    mods = [model.get_submodule(n) for n in block.modules]
    if family in ("ResNet", "RegNet"):  # avgpool module, then flatten, then fc
        return nn.Sequential(mods[0], nn.Flatten(1), mods[1])
    if family == "MobileNetV2":  # features[-1], then adaptive_avg_pool2d + flatten, then classifier
        return nn.Sequential(mods[0], PoolFlatten(), mods[1])
    if family == "MNASNet":  # layers 14.., then mean over H, W, then classifier
        return nn.Sequential(*mods[:-1], _SpatialMean(), mods[-1])
    return nn.Sequential(*mods)


class _SpatialMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean([2, 3])
