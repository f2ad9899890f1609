"""Executable units the reconstruction engine can call with one tensor: embeddings, one layer, the head.

A Hugging Face transformer layer takes the hidden state plus keyword inputs the model computes once
per forward pass: the attention mask (causal and padding), position ids, rotary position embeddings,
cache positions. The engine caches and feeds only the hidden state, so ``LayerUnit`` captures those
extra inputs from the model itself: it runs the model's own forward on a dummy batch of the same
sequence length up to the layer, records every argument the layer receives except the hidden state,
and replays them (broadcast to the batch) on each call. Calibration windows have a fixed length and no
padding, so the captured inputs are the same for every sample; a batch of another length triggers a new
capture. The layer's tuple output is reduced to its hidden state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden state of a layer's output (a tensor, or the first element of a tuple / ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    if hasattr(output, "to_tuple"):
        return first_tensor(output.to_tuple()[0])
    raise TypeError(f"cannot find the hidden state in a {type(output).__name__}")


def _expand(value: Any, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == 1 and batch != 1:
            return value.expand(batch, *value.shape[1:])
        return value
    if isinstance(value, tuple):
        return tuple(_expand(v, batch) for v in value)
    return value


RunPrefix = Callable[[nn.Module, torch.Tensor], Any]


class LayerUnit(nn.Module):
    """One transformer layer called with the hidden state only; the model's extra inputs are replayed."""

    def __init__(self, model: nn.Module, layer: nn.Module, run_model: RunPrefix, vocab_size: int) -> None:
        super().__init__()
        self.layer = layer
        # kept out of the module tree: the unit owns only its layer's parameters
        self._model = [model]
        self._run_model = run_model
        self._vocab_size = vocab_size
        self._captured: dict[tuple[int, str], tuple[tuple[Any, ...], dict[str, Any]]] = {}

    @torch.no_grad()
    def _capture(self, length: int, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
        key = (length, str(device))
        if key in self._captured:
            return self._captured[key]
        found: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            found["args"], found["kwargs"] = args[1:], dict(kwargs)
            raise StopForward

        ids = torch.full((1, length), min(4, self._vocab_size - 1), dtype=torch.long, device=device)
        handle = self.layer.register_forward_pre_hook(hook, with_kwargs=True)
        model = self._model[0]
        was_training = model.training
        model.eval()
        try:
            self._run_model(model, ids)
        except StopForward:
            pass
        finally:
            handle.remove()
            model.train(was_training)
        if not found:
            raise RuntimeError("the layer was not reached by the model's forward pass")
        kwargs = {k: v for k, v in found["kwargs"].items() if k not in ("past_key_values", "past_key_value",
                                                                         "layer_past")}
        self._captured[key] = (found["args"], kwargs)
        return self._captured[key]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = self._capture(hidden.shape[1], hidden.device)
        batch = hidden.shape[0]
        args = tuple(_expand(a, batch) for a in args)
        kwargs = {k: _expand(v, batch) for k, v in kwargs.items()}
        return first_tensor(self.layer(hidden, *args, **kwargs))


class EmbeddingUnit(nn.Module):
    """Token ids to the first layer's input, computed by the model's own forward (full precision)."""

    def __init__(self, model: nn.Module, first_layer: nn.Module, run_model: RunPrefix,
                 modules: tuple[nn.Module, ...]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)  # the embedding modules, so that .to() / parameters() see them
        self._model = [model]
        self._first_layer = first_layer
        self._run_model = run_model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        found: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            found["hidden"] = args[0]
            raise StopForward

        handle = self._first_layer.register_forward_pre_hook(hook)
        try:
            self._run_model(self._model[0], ids)
        except StopForward:
            pass
        finally:
            handle.remove()
        if "hidden" not in found:
            raise RuntimeError("the first transformer layer was not reached by the model's forward pass")
        return found["hidden"]


class HeadUnit(nn.Module):
    """The modules after the last layer, run in order (final norm, projections, task head)."""

    def __init__(self, modules: tuple[nn.Module, ...]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden
        for part in self.parts:
            x = first_tensor(part(x))
        return x
