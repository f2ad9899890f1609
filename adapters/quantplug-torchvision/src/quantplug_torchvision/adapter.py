"""The torchvision model adapter: model ids, loading, structure, task loss and metrics.

Model ids:

* ``zoo:resnet18-fmnist``, ``zoo:mobilenetv2-fmnist``: the Fashion-MNIST zoo trained here (weights ship
  with this package as fp16 safetensors with their measured accuracy in a json file);
* ``torchvision:NAME`` (e.g. ``torchvision:resnet18``) with option ``weights`` (``DEFAULT`` or an enum
  name such as ``IMAGENET1K_V1``) through torchvision's weight enums and their download cache, and
  ``num_classes`` for a fresh model;
* ``local:PATH``: a pickled ``nn.Module`` (``torch.save(model)``), a TorchScript file, or a state dict
  with the option ``arch`` naming the torchvision architecture (and ``num_classes``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantplug.errors import DataError, ModelLoadError
from quantplug.interfaces import ModelAdapter, UnitSpec
from quantplug_torchvision.image_folder import folder_spec, is_folder_spec, parse_folder_spec
from quantplug_torchvision.structure import blocks_of, family_of, head_module

logger = logging.getLogger(__name__)

ZOO_ENV = "QUANTPLUG_ZOO_DIR"
ZOO_ALIASES = {"resnet18-fmnist": "resnet18", "mobilenetv2-fmnist": "mobilenet_v2",
               "resnet50-fmnist": "resnet50", "regnetx-fmnist": "regnet_x_400mf"}


def zoo_dir() -> Path:
    env = os.environ.get(ZOO_ENV)
    if env:
        return Path(env)
    return Path(str(resources.files("quantplug_torchvision").joinpath("zoo")))


def zoo_entry(name: str) -> tuple[Path, dict[str, Any]]:
    """Weights path and metadata of a zoo model (``resnet18-fmnist``...)."""
    arch = ZOO_ALIASES.get(name)
    if arch is None:
        raise ModelLoadError(f"unknown zoo model {name!r}; the zoo has: zoo:{', zoo:'.join(ZOO_ALIASES)}")
    directory = zoo_dir()
    weights, meta = directory / f"{arch}-fmnist.safetensors", directory / f"{arch}-fmnist.json"
    if not weights.is_file() or not meta.is_file():
        raise ModelLoadError(
            f"zoo model {name!r} has no weights in {directory}; train it with "
            f"`python adapters/quantplug-torchvision/zoo/train_zoo.py --arch {arch}` (see zoo/README.md) "
            f"or point {ZOO_ENV} at a directory holding {weights.name}"
        )
    return weights, json.loads(meta.read_text())


def available_zoo_models() -> list[str]:
    out = []
    for name in ZOO_ALIASES:
        try:
            zoo_entry(name)
        except ModelLoadError:
            continue
        out.append(name)
    return out


def pretrained_weights(arch: str, weights: str) -> Any:
    """The torchvision weights enum member ``weights`` (``DEFAULT`` or a name such as ``IMAGENET1K_V2``) of ``arch``."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError as exc:
        raise ModelLoadError(f"torchvision has no model {arch!r} with pretrained weights") from exc
    try:
        return enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]
    except KeyError as exc:
        names = ", ".join(w.name for w in enum)
        raise ModelLoadError(f"{arch} has no weights {weights!r}; choose DEFAULT or one of: {names}") from exc


def _build_torchvision(arch: str, weights: str | None = None, num_classes: int | None = None) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError as exc:
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models))[:40])
        raise ModelLoadError(f"torchvision has no model {arch!r}; some names: {known}...") from exc
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if weights is None:
        return builder(weights=None, **kwargs)
    chosen = pretrained_weights(arch, weights)
    try:
        return builder(weights=chosen, **kwargs)
    except Exception as exc:  # no network: say where the file goes
        hub = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(chosen.url)
        raise ModelLoadError(
            f"could not load {arch} weights {chosen.name} ({exc.__class__.__name__}: {exc}). Without network access, "
            f"download {chosen.url} elsewhere and put it at {hub} (torch.hub's cache; TORCH_HOME moves it)"
        ) from exc


def load_local(path: str, options: Mapping[str, Any]) -> nn.Module:
    if not os.path.exists(path):
        raise ModelLoadError(f"model file {path!r} does not exist")
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(path, map_location="cpu")
    except Exception:
        pass
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"{path} is neither a TorchScript file nor a torch.save file: {exc}") from exc
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        state = obj.get("state_dict", obj)
        arch = options.get("arch")
        if not arch:
            raise ModelLoadError(f"{path} holds a state dict: name its architecture with --arch (e.g. resnet18)")
        model = _build_torchvision(str(arch), None, options.get("num_classes"))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(f"{path} does not fit {arch}: {exc}") from exc
        return model
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")


class TorchvisionAdapter(ModelAdapter):
    """torchvision classifiers (ResNet, MobileNetV2, RegNet, MNASNet, any Conv2d/Linear model): top-1 / top-5."""

    name = "torchvision"
    prefixes = ("zoo", "torchvision", "local")
    default_model = "zoo:resnet18-fmnist"

    def can_load(self, model_id: str) -> bool:
        """``torchvision:`` ids, this zoo's names and ``local:`` files; other adapters share ``zoo:`` and
        ``local:`` (a Hugging Face directory is not a torchvision model)."""
        source, sep, rest = model_id.partition(":")
        if not sep:
            return False
        if source == "zoo":
            return rest in ZOO_ALIASES
        if source == "local":
            return not os.path.isdir(rest)
        return source == "torchvision"

    def default_available(self) -> bool:
        return "resnet18-fmnist" in available_zoo_models()

    def load(self, model_id: str, *, device: torch.device, options: Mapping[str, Any] | None = None) -> nn.Module:
        options = dict(options or {})
        source, _, rest = model_id.partition(":")
        if source == "zoo":
            weights, meta = zoo_entry(rest)
            from safetensors.torch import load_file

            model = _build_torchvision(meta["arch"], None, 10)
            state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
            model.load_state_dict(state)
            # the zoo model was trained at this size; other sizes run but give meaningless accuracy
            model.quantplug_input_size = (model_id, tuple(int(v) for v in meta.get("input_size", [3, 32, 32])))
        elif source == "torchvision":
            model = _build_torchvision(rest, options.get("weights"), options.get("num_classes"))
        else:
            model = load_local(rest, options)
        if isinstance(model, torch.jit.ScriptModule):
            raise ModelLoadError("TorchScript models cannot be re-wrapped for quantization; save the nn.Module instead")
        return model.to(device).eval()

    def default_data(self, model_id: str) -> str | None:
        source, _, rest = model_id.partition(":")
        if source == "zoo":
            _, meta = zoo_entry(rest)
            size = int(meta.get("input_size", [3, 32, 32])[-1])
            return f"fmnist-subset:{size}"
        return None

    def bind_data(self, model_id: str, data: str, options: Mapping[str, Any] | None = None) -> str:
        """An image-folder spec gets the preprocessing of the model's named weights (``--weights``) and the
        number of classes the model predicts (the weights' categories, or ``--num-classes``); options the
        spec already has are kept. Other specs, and models of unknown width (``local:`` modules), are unchanged.
        """
        if not is_folder_spec(data):
            return data
        options = options or {}
        root, given = parse_folder_spec(data)
        source, _, rest = model_id.partition(":")
        bound: dict[str, Any] = {}
        if source == "torchvision" and options.get("weights"):
            chosen = pretrained_weights(rest, str(options["weights"]))
            bound["weights"] = f"{type(chosen).__name__}.{chosen.name}"
            categories = chosen.meta.get("categories")
            if categories:
                bound["classes"] = len(categories)
        if options.get("num_classes") is not None:
            bound["classes"] = int(options["num_classes"])
        return folder_spec(root, {**bound, **given})

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        expected = getattr(model, "quantplug_input_size", None)
        if expected is not None and isinstance(inputs, torch.Tensor) and tuple(inputs.shape[1:]) != expected[1]:
            model_id, shape = expected
            raise DataError(
                f"{model_id} was trained on {shape[1]}x{shape[2]} inputs but got {tuple(inputs.shape[1:])}: "
                f"use --data fmnist:{shape[-1]} (or fmnist-subset:{shape[-1]}), or leave --data out for its default"
            )
        return model(inputs)

    def blocks(self, model: nn.Module) -> list[UnitSpec]:
        return blocks_of(model)

    def block_module(self, model: nn.Module, block: UnitSpec) -> nn.Module:
        if block.name == "head" and family_of(model) is not None:
            return head_module(model, block)
        return super().block_module(model, block)

    def metrics(self, outputs: torch.Tensor, targets: Any) -> dict[str, float]:
        k = min(5, outputs.shape[1])
        top = outputs.topk(k, 1).indices
        return {
            "top1": 100.0 * float((top[:, 0] == targets).sum()),
            "top5": 100.0 * float((top == targets[:, None]).any(1).sum()),
            "count": float(targets.shape[0]),
        }
