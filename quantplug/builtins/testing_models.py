"""The built-in adapter and data source for the tiny models of ``quantplug.testing``.

Model ids: ``testing:tiny-resnet`` (trained weights ship with the package), ``testing:tiny-decoder``,
``testing:tiny-encoder``. Data: ``synthetic:images`` and ``synthetic:tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from importlib import resources
from typing import Any

import torch
from torch import nn

from quantplug.errors import DataError, ModelLoadError
from quantplug.hookspecs import hookimpl
from quantplug.interfaces import DataSource, ModelAdapter, UnitSpec
from quantplug.testing import data as synthetic
from quantplug.testing import models as tiny

MODELS = {
    "tiny-resnet": (tiny.tiny_resnet, "synthetic:images", "tiny-resnet.safetensors"),
    "tiny-decoder": (tiny.tiny_decoder, "synthetic:tokens", "tiny-decoder.safetensors"),
    "tiny-encoder": (tiny.tiny_encoder, "synthetic:tokens", None),
}


def weights_path(filename: str) -> Any:
    return resources.files("quantplug").joinpath("data", filename)


class TinyModelAdapter(ModelAdapter):
    """Adapter for the tiny models of ``quantplug.testing`` (the embedded default and the test suite)."""

    name = "testing"
    prefixes = ("testing",)
    default_model = "testing:tiny-resnet"

    def _key(self, model_id: str) -> str:
        key = model_id.split(":", 1)[1]
        if key not in MODELS:
            raise ModelLoadError(f"unknown testing model {model_id!r}; available: testing:{', testing:'.join(MODELS)}")
        return key

    def load(self, model_id: str, *, device: torch.device, options: Mapping[str, Any] | None = None) -> nn.Module:
        factory, _, weights = MODELS[self._key(model_id)]
        model = factory()
        if weights is not None:
            path = weights_path(weights)
            if path.is_file():
                from safetensors.torch import load

                model.load_state_dict(load(path.read_bytes()))
        return model.to(device).eval()

    def default_data(self, model_id: str) -> str | None:
        return MODELS[self._key(model_id)][1]

    def blocks(self, model: nn.Module) -> list[UnitSpec]:
        return model.quant_blocks()  # type: ignore[operator]

    def task_loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        if outputs.dim() == 3:
            if outputs.shape[-1] != int(targets.max()) + 1 and outputs.shape[-1] < synthetic.VOCAB:
                return (outputs ** 2).mean()  # encoder features: no task head
            return nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten())
        return nn.functional.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: Any) -> dict[str, float]:
        if outputs.dim() == 3 and outputs.shape[-1] == synthetic.VOCAB:
            nll = nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="sum")
            return {"nll": float(nll), "count": float(targets.numel())}
        if outputs.dim() == 3:
            tokens = float(outputs.shape[0] * outputs.shape[1])
            return {"feature_norm": float(outputs.norm(dim=-1).sum()), "count": tokens}
        top1 = (outputs.argmax(1) == targets).sum()
        top5 = (outputs.topk(min(5, outputs.shape[1]), 1).indices == targets[:, None]).any(1).sum()
        return {"top1": 100.0 * float(top1), "top5": 100.0 * float(top5), "count": float(targets.shape[0])}

    def finalize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        out = super().finalize_metrics(sums)
        if "nll" in out:
            out["perplexity"] = math.exp(out.pop("nll"))
        return out


class SyntheticData(DataSource):
    """Deterministic synthetic data for the tiny models (``synthetic:images``, ``synthetic:tokens``)."""

    name = "synthetic"
    prefixes = ("synthetic",)

    def load(self, spec: str, split: str, *, num_samples: int | None, seed: int) -> torch.utils.data.Dataset:
        kind = spec.split(":", 1)[1] if ":" in spec else ""
        if split not in ("train", "test"):
            raise DataError(f"synthetic data has splits train and test, not {split!r}")
        if num_samples is not None and num_samples < 1:
            raise DataError(f"the number of {split} samples must be at least 1, not {num_samples}")
        n = num_samples if num_samples is not None else (2048 if split == "train" else 1000)
        if kind == "images":
            return synthetic.synthetic_images(n, split, seed)
        if kind == "tokens":
            return synthetic.synthetic_tokens(n, split, seed)
        raise DataError(f"unknown synthetic data {spec!r}; use synthetic:images or synthetic:tokens")


@hookimpl
def register_model_adapters(register) -> None:  # type: ignore[no-untyped-def]
    register(TinyModelAdapter)


@hookimpl
def register_data_sources(register) -> None:  # type: ignore[no-untyped-def]
    register(SyntheticData)
