"""Straight-through weights and learned step sizes (LSQ: Esser et al., "Learned Step Size Quantization", ICLR 2020).

Forward: ``w_q = (clamp(round(w / s) + z, qmin, qmax) - z) * s``. Backward (straight-through estimator,
Bengio et al. 2013): ``dw_q / dw = 1`` inside the grid and 0 where ``w`` is clipped; LSQ's step gradient
``dw_q / ds = round(w / s) - w / s`` inside and ``qmin - z`` / ``qmax - z`` at the clip (this is what
``quantplug.quantizer.fake_quant`` computes). The step gradient is multiplied by LSQ's
``g = 1 / sqrt(N * Q_P)`` with ``N`` the number of weights per step (weights) or of features per sample
(activations) and ``Q_P`` the top of the grid (``2^b - 1`` on an asymmetric grid; LSQ's signed weight grid has
``2^(b-1) - 1``). ``g`` changes training only under SGD (LSQ's optimizer): Adam normalizes each gradient by its
running RMS, which cancels a constant factor.

``LSQWeight`` plugs into a quantized layer as its ``WeightRounder``: it holds a latent float weight,
initialized from the layer's hardened integer codes so fine-tuning starts exactly at the PTQ result.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.interfaces import WeightRounder
from quantplug.modules import QuantLayer
from quantplug.quantizer import AffineQuantizer, fake_quant_rows, from_rows, grad_scale, quantize, to_rows

STEP_FLOOR = 1e-8


def lsq_factor(elements_per_step: float, qmax: int) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(N * Q_P)``."""
    return 1.0 / math.sqrt(max(elements_per_step, 1.0) * max(qmax, 1))


class LSQWeight(WeightRounder):
    """Latent weight with a straight-through round and the layer's weight step learned with LSQ (Esser et al. 2020).

    ``init="codes"`` starts from the dequantized hard codes of the PTQ run (so the starting model is the PTQ
    model, whatever rounding produced it; a layer without hard codes rounds its weight to nearest, so it starts
    from that weight); ``init="float"`` from the layer's full-precision weight. Lookup-table layers (k-means, TTQ)
    are refused: their values are on no affine grid.
    """

    def __init__(self, layer: QuantLayer, init: str = "codes") -> None:
        super().__init__()
        quantizer = layer.weight_quantizer
        assert quantizer is not None and layer.weight_spec is not None
        if layer.has_codebook:
            raise ConfigError("LSQWeight trains affine codes; this layer holds a lookup-table (codebook) weight "
                              "(k-means, TTQ), which hardening would replace: fine-tune it with its own pass")
        self.spec = layer.weight_spec
        with torch.no_grad():
            if init == "codes" and layer.weight_codes is not None:
                start = layer.dequantize_codes(layer.weight_codes)
            else:
                start = layer.weight.detach()
        self.latent = nn.Parameter(start.detach().clone())
        self.weight_step = quantizer.make_step_learnable()
        self.register_buffer("zero_point", quantizer.zero_point.detach().clone())
        self.factor = lsq_factor(self.latent.numel() / max(self.weight_step.numel(), 1), self.spec.qmax)

    def forward(self) -> torch.Tensor:
        step = grad_scale(self.weight_step, self.factor)
        return fake_quant_rows(self.latent, step, self.zero_point, self.spec)

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        rows = to_rows(self.latent.detach(), self.spec)
        step = self.weight_step.detach().clamp(min=STEP_FLOOR)
        codes = quantize(rows, step[:, None], self.zero_point[:, None], self.spec.qmin, self.spec.qmax)
        return from_rows(codes, self.latent.shape, self.spec)

    def final_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight_step.detach().clamp(min=STEP_FLOOR).clone(), self.zero_point.clone()


class ActivationSteps:
    """Makes the activation quantizers' steps learnable with LSQ's gradient scale, per sample features.

    ``N`` is the number of elements one sample feeds the quantizer (LSQ's "number of features"), read on
    the first forward pass; the step's gradient is multiplied by ``1 / sqrt(N * Q_P)``.
    """

    def __init__(self, quantizers: list[AffineQuantizer]) -> None:
        self.quantizers = quantizers
        self.features: dict[int, float] = {}
        self.handles: list[Any] = []
        self.params: list[nn.Parameter] = []
        for q in quantizers:
            step = q.make_step_learnable()
            self.params.append(step)
            self.handles.append(q.register_forward_pre_hook(self._record(id(q))))
            self.handles.append(step.register_hook(self._scale(id(q), q.spec.qmax)))

    def _record(self, key: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            self.features[key] = x[0].numel() if x.dim() > 1 else x.numel()

        return hook

    def _scale(self, key: int, qmax: int):  # type: ignore[no-untyped-def]
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * lsq_factor(self.features.get(key, 1.0), qmax)

        return hook

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.params:
            p.clamp_(min=STEP_FLOOR)

    def freeze(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for q in self.quantizers:
            with torch.no_grad():
                if isinstance(q.scale, nn.Parameter):
                    q.scale.clamp_(min=STEP_FLOOR)
            q.freeze_step()
