"""Activation regularization (AR) of NWQ (Wang et al., NeurIPS 2022, Sec. "Activation Regularization").

The paper's objective is ``loss = L_quant + sum_{i=1}^{N-1} AR_i(x_i, x^_i)``: the loss on the network's
output plus, for every intermediate sub-net output ``i``, a distance between the full-precision
activation ``x_i`` and the quantized network's ``x^_i``. It keeps the intermediate activation
distribution of the jointly optimized (and therefore easily over-fitted) network close to the FP one.

Choices (the paper's text was not available to us; see the plugin README):

* the intermediate outputs are the outputs of the unit's blocks except the last (whose output is the
  unit's output, compared by ``L_quant``): with the ``network`` scheduler these are the adapter's blocks
  (stem, every residual / inverted-residual block), i.e. where BRECQ / QDrop reconstruct;
* ``L_quant`` and each ``AR_i`` use BRECQ's ``lp_loss`` (``|a - b|^2`` summed over channels, averaged over
  batch and positions: quantplug's ``mse``), so with ``ar_weight = 1`` the objective is the network output
  loss plus the block-wise losses BRECQ / QDrop would minimize one block at a time; ``output_loss="kl"``
  replaces ``L_quant`` by the temperature-T KL divergence of the predictions (distillation);
* the FP intermediate outputs come from the FP model on the calibration inputs, captured once per unit as
  loss extras (``fp_features="cache"``: memory ``samples x sum of block output sizes x bytes``, fp16 with
  ``cache_dtype="float16"``), or recomputed by the FP blocks from the unit's input at every evaluation
  (``fp_features="recompute"``: no memory, one extra FP forward per iteration; for a unit that does not
  start at the network input the FP blocks then see the quantized model's unit input);
* the quantized intermediate outputs are read by forward hooks on the quantized model's block modules,
  attached in ``begin`` and removed in ``end`` (both called by the engine around the unit).

Used on its own (no ``begin``, e.g. by the conformance kit) the loss is ``L_quant`` alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from quantplug.builtins.losses import LpLoss
from quantplug.builtins.losses import softmax_kl as kl_divergence
from quantplug.cache import human_bytes
from quantplug.errors import ConfigError, QuantplugError
from quantplug.interfaces import LossContext, ReconstructionLoss, ReconUnit
from quantplug.tensors import to_device as _to_device

__all__ = ["ActivationRegularizationLoss", "EXTRA_PREFIX", "kl_divergence"]

logger = logging.getLogger(__name__)

#: extras key of block ``name``'s full-precision output: ``EXTRA_PREFIX + name``
EXTRA_PREFIX = "ar:"
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ActivationRegularizationLoss(ReconstructionLoss):
    """NWQ's objective (Wang et al., NeurIPS 2022): output loss plus ``ar_weight`` times the distances between
    the quantized and full-precision outputs of every intermediate block of the unit."""

    name = "activation-regularization"

    @dataclass(frozen=True)
    class Config:
        ar_weight: float = 1.0  # weight of each AR_i term
        output_loss: str = "mse"  # mse (BRECQ's lp_loss on the unit output) | kl (prediction distillation)
        temperature: float = 1.0  # T of output_loss="kl"
        fp_features: str = "cache"  # cache (captured once, as loss extras) | recompute (FP blocks every evaluation)
        cache_dtype: str = "float32"  # float32 | float16, for fp_features="cache"

    def __init__(self, config: ActivationRegularizationLoss.Config | None = None) -> None:
        super().__init__(config)
        c = self.config
        if not c.ar_weight >= 0:
            raise ConfigError(f"activation-regularization ar_weight must be >= 0, got {c.ar_weight}")
        if c.output_loss not in ("mse", "kl"):
            raise ConfigError(f"activation-regularization output_loss must be 'mse' or 'kl', got {c.output_loss!r}")
        if not c.temperature > 0:
            raise ConfigError(f"activation-regularization temperature must be positive, got {c.temperature}")
        if c.fp_features not in ("cache", "recompute"):
            raise ConfigError(f"activation-regularization fp_features must be 'cache' or 'recompute', "
                              f"got {c.fp_features!r}")
        if c.cache_dtype not in _DTYPES:
            raise ConfigError(f"activation-regularization cache_dtype must be one of {sorted(_DTYPES)}, "
                              f"got {c.cache_dtype!r}")
        self._lp = LpLoss()
        self._handles: list[RemovableHandle] = []
        self._blocks: tuple[str, ...] = ()  # the intermediate blocks of the current unit, forward order
        self._quant: dict[str, torch.Tensor] = {}  # latest quantized block outputs (with their graph)
        self._fp: dict[str, torch.Tensor] = {}  # latest recomputed FP block outputs (fp_features="recompute")

    # ------------------------------------------------------------------ engine hooks
    @staticmethod
    def intermediate_blocks(unit: ReconUnit) -> tuple[str, ...]:
        """The blocks whose outputs are regularized: every block of the unit but the last."""
        return tuple(unit.blocks[:-1]) if not unit.is_layer else ()

    def capture_extras(self, run: Any, unit: Any) -> Mapping[str, torch.Tensor]:
        blocks = self.intermediate_blocks(unit)
        if self.config.fp_features != "cache" or not blocks or self.config.ar_weight == 0:
            return {}
        return self._capture_fp_outputs(run, blocks)

    @torch.no_grad()
    def _capture_fp_outputs(self, run: Any, blocks: tuple[str, ...]) -> dict[str, torch.Tensor]:
        dtype = _DTYPES[self.config.cache_dtype]
        total = sum(x.shape[0] if isinstance(x, torch.Tensor) else len(x) for x in run.calib_inputs)
        store: dict[str, torch.Tensor] = {}
        position = 0

        def keep(name: str, out: torch.Tensor) -> None:
            if name not in store:
                store[name] = torch.empty((total, *out.shape[1:]), dtype=dtype)
            store[name][position:position + out.shape[0]] = out.detach().to("cpu", dtype)

        handles = [run.fp_model.get_submodule(run.block(b).modules[-1]).register_forward_hook(
            lambda m, a, out, name=b: keep(name, out)) for b in blocks]
        try:
            for inputs in run.calib_inputs:
                run.adapter.forward(run.fp_model, _to_device(inputs, run.device))
                position += inputs.shape[0] if isinstance(inputs, torch.Tensor) else len(inputs)
        finally:
            for h in handles:
                h.remove()
        size = sum(t.numel() * t.element_size() for t in store.values())
        logger.info("activation-regularization: FP outputs of %d blocks cached, %s in RAM", len(store),
                    human_bytes(size))
        return {EXTRA_PREFIX + name: t for name, t in store.items()}

    def begin(self, run: Any, unit: Any) -> None:
        self.end(run, unit)  # a unit that failed half-way may have left hooks behind
        self._blocks = self.intermediate_blocks(unit) if self.config.ar_weight > 0 else ()
        for b in self._blocks:
            module = run.q_model.get_submodule(run.block(b).modules[-1])
            self._handles.append(module.register_forward_hook(
                lambda m, a, out, name=b: self._quant.__setitem__(name, out)))
        if self.config.fp_features == "recompute" and self._blocks:
            fp_blocks = [(b, run.adapter.block_module(run.fp_model, run.block(b))) for b in self._blocks]
            entry = run.q_model.get_submodule(run.block(unit.blocks[0]).modules[0])
            self._handles.append(entry.register_forward_pre_hook(
                lambda m, args: self._recompute(fp_blocks, args[0])))

    @torch.no_grad()
    def _recompute(self, fp_blocks: list[tuple[str, nn.Module]], x: torch.Tensor) -> None:
        for name, block in fp_blocks:
            x = block(x)
            self._fp[name] = x

    def end(self, run: Any, unit: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._quant.clear()
        self._fp.clear()
        self._blocks = ()

    # ------------------------------------------------------------------ objective
    def output_loss(self, output: torch.Tensor, target: torch.Tensor, context: LossContext) -> torch.Tensor:
        if self.config.output_loss == "kl":
            return kl_divergence(output, target.detach(), self.config.temperature)
        return self._lp(output, target, context)

    def regularization(self, context: LossContext) -> torch.Tensor | None:
        """``sum_i lp(x^_i, x_i)`` over the unit's intermediate blocks (None before ``begin`` / without blocks)."""
        if not self._blocks:
            return None
        total: torch.Tensor | None = None
        for name in self._blocks:
            quant = self._quant.get(name)
            fp = self._fp.get(name) if self.config.fp_features == "recompute" else context.extras.get(
                EXTRA_PREFIX + name)
            if quant is None or fp is None:
                raise QuantplugError(
                    f"activation-regularization: no {'quantized' if quant is None else 'full-precision'} output of "
                    f"block {name!r} for this batch; the loss must be evaluated right after the unit's forward pass")
            term = self._lp(quant, fp.to(quant.dtype), context)
            total = term if total is None else total + term
        return total

    def __call__(self, output: torch.Tensor, target: torch.Tensor, context: LossContext) -> torch.Tensor:
        loss = self.output_loss(output, target, context)
        reg = self.regularization(context)
        if reg is not None:
            loss = loss + self.config.ar_weight * reg
        self._quant.clear()
        self._fp.clear()
        return loss
