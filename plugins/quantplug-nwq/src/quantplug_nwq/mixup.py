"""Annealing mixup (AMixup) of NWQ (Wang et al., NeurIPS 2022, Sec. "Annealing Mixup").

The paper mixes full-precision and quantized activations element-wise,
``x^ = where(rand() < p(t), x, x_q)``, with the probability ``p(t)`` of keeping the full-precision value
annealed to 0 so that the network ends in its deployed, fully quantized state. It is QDrop's random
drop of activation quantization with a ratio that changes over the iterations (QDrop's probability
of *quantizing* is ``1 - p(t)``).

Here the mixing happens at every activation quantizer of the unit (each quantized layer's input),
through the quantizer's ``mixer`` hook as QDrop's ``drop`` policy does. In network-wise reconstruction
the unit's input is the calibration input itself, so no full-precision copy of the unit input is
needed (``needs_fp_inputs`` is False); ``x`` is the layer input of the mixed network.

The schedule is ours (the paper's slides give only the form): ``p(t)`` starts at ``start_fp_prob``
(0.5, QDrop's ratio, so AMixup starts where QDrop stays) and decays to 0 at ``end_progress`` (0.8; the
last 20 % of the iterations run fully quantized), linearly or along a half cosine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.interfaces import ActivationPolicy

__all__ = ["AnnealingMixupPolicy", "fp_probability_at"]


def fp_probability_at(progress: float, start: float, end_progress: float, schedule: str = "linear") -> float:
    """Probability of keeping an element in full precision at ``progress`` in [0, 1]: ``start`` at 0,
    decaying (``linear`` or ``cosine``) to 0 at ``end_progress`` and 0 afterwards."""
    if progress >= end_progress:
        return 0.0
    rel = max(0.0, progress) / end_progress
    if schedule == "cosine":
        return start * 0.5 * (1.0 + math.cos(math.pi * rel))
    return start * (1.0 - rel)


class AnnealingMixupPolicy(ActivationPolicy):
    """NWQ's annealing mixup (Wang et al., NeurIPS 2022): each activation element is kept in full precision
    with probability p(t), quantized otherwise; p(t) anneals from ``start_fp_prob`` to 0."""

    name = "annealing-mixup"
    needs_fp_inputs = False

    @dataclass(frozen=True)
    class Config:
        start_fp_prob: float = 0.5  # p(0): probability that an element keeps its full-precision value
        end_progress: float = 0.8  # fraction of the iterations at which p reaches 0
        schedule: str = "linear"  # linear | cosine

    def __init__(self, config: AnnealingMixupPolicy.Config | None = None) -> None:
        super().__init__(config)
        c = self.config
        if not 0.0 <= c.start_fp_prob <= 1.0:
            raise ConfigError(f"annealing-mixup start_fp_prob must be in [0, 1], got {c.start_fp_prob}")
        if not 0.0 < c.end_progress <= 1.0:
            raise ConfigError(f"annealing-mixup end_progress must be in (0, 1], got {c.end_progress}")
        if c.schedule not in ("linear", "cosine"):
            raise ConfigError(f"annealing-mixup schedule must be 'linear' or 'cosine', got {c.schedule!r}")
        self.fp_prob = c.start_fp_prob
        self._generator: torch.Generator | None = None

    def step(self, progress: float) -> None:
        c = self.config
        self.fp_prob = fp_probability_at(progress, c.start_fp_prob, c.end_progress, c.schedule)

    def begin(self, quantizers: Sequence[nn.Module], generator: torch.Generator | None = None) -> None:
        self._generator = generator
        self.fp_prob = self.config.start_fp_prob
        for q in quantizers:
            q.mixer = self.mix

    def _rand(self, like: torch.Tensor) -> torch.Tensor:
        gen = self._generator
        if gen is not None and gen.device != like.device:  # a CPU generator seeds one on the tensor's device
            seed = int(torch.randint(2**62, (1,), generator=gen))
            gen = self._generator = torch.Generator(device=like.device).manual_seed(seed)
        return torch.rand(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    def mix(self, x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        """``where(rand < p(t), x, x_q)``; no random draw once p(t) is 0."""
        if self.fp_prob <= 0.0:
            return xq
        if self.fp_prob >= 1.0:
            return x
        return torch.where(self._rand(x) < self.fp_prob, x, xq)

    def end(self, quantizers: Sequence[nn.Module]) -> None:
        self._generator = None
        self.fp_prob = self.config.start_fp_prob
        super().end(quantizers)
