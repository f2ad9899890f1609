"""QDrop: "Randomly Dropping Quantization for Extremely Low-bit Post-Training Quantization" (Wei et al., ICLR 2022).

BRECQ's parts (AdaRound rounding, block reconstruction) plus the ``drop`` activation policy: during
reconstruction every activation element is quantized with probability ``prob`` (0.5) and kept in full
precision otherwise, ``torch.where(rand < prob, x_q, x)`` (wimh966/QDrop). At the unit's input the
kept elements come from the full-precision model (the official ``input_prob`` mixing
``where(rand < p, quantized-model input, fp-model input)``). Activation step sizes are learned
jointly with the rounding (LSQ-style, Adam lr 4e-5, cosine decay); the loss is plain MSE as in the
released configs.

The unit input is mixed once, with one mask, as in the official code: every consumer of the input (conv1 and
the downsample, the identity shortcut, a LayerNorm or pooling first in the unit) reads the same mix. Inside
the unit each layer input quantizer draws its own mask.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantplug import hookimpl
from quantplug.interfaces import ActivationPolicy
from quantplug.recipes import RecipeSpec

__all__ = ["DropPolicy", "QDROP"]


class DropPolicy(ActivationPolicy):
    """QDrop's element-wise random drop of activation quantization (Wei et al., ICLR 2022)."""

    name = "drop"
    needs_fp_inputs = True
    controls_unit_entry = True

    @dataclass(frozen=True)
    class Config:
        prob: float = 0.5  # probability that an element is quantized
        input_mixing: bool = True  # unit input: dropped elements take the full-precision model's value
        #: weights-only runs (no activation quantizers): mix the unit input all the same,
        #: ``where(rand < prob, quantized-model input, fp-model input)``, as the released code's ``input_prob`` does
        #: whatever the activation bits; off by default so far (see the README)
        mix_weight_only_inputs: bool = False

    def __init__(self, config: DropPolicy.Config | None = None) -> None:
        super().__init__(config)
        if not 0.0 <= self.config.prob <= 1.0:
            from quantplug.errors import ConfigError

            raise ConfigError(f"drop prob must be in [0, 1], got {self.config.prob}")
        self._generator: torch.Generator | None = None
        self._unit_input: torch.Tensor | None = None
        self._fp_input: torch.Tensor | None = None
        self._entry_in_full = False
        self._has_quantizers = False
        self._entry_mask: torch.Tensor | None = None
        self._quant_input: torch.Tensor | None = None  # the unit's quantized-model input (PD-Quant's branch)

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        gen = self._generator
        if gen is not None and gen.device != device:
            seed = int(torch.randint(2**62, (1,), generator=gen))
            gen = self._generator = torch.Generator(device=device).manual_seed(seed)
        return gen

    def _rand(self, like: torch.Tensor) -> torch.Tensor:
        return torch.rand(like.shape, generator=self._generator_for(like.device), device=like.device,
                          dtype=like.dtype)

    def _quantize_mask(self, like: torch.Tensor) -> torch.Tensor:
        """Bernoulli(prob) per element, True = quantize. Drawn as random bytes compared with
        ``round(prob * 256)``: seven bytes per 64-bit draw, a seventh of the generator calls of one float
        per element (the mask is the largest elementwise cost of a QDrop step). ``prob`` is therefore used
        in steps of 1/256 (0.5 exactly)."""
        threshold = round(self.config.prob * 256)
        if threshold >= 256:
            return torch.ones(like.shape, dtype=torch.bool, device=like.device)
        n = like.numel()
        words = torch.empty((n + 6) // 7, dtype=torch.int64, device=like.device)
        words.random_(generator=self._generator_for(like.device))  # uniform in [0, 2**63): the top bit is 0
        octets = words.view(torch.uint8).view(-1, 8)
        octets = octets[:, :7] if sys.byteorder == "little" else octets[:, 1:]
        return (octets.reshape(-1)[:n] < threshold).view(like.shape)

    def begin(self, quantizers: Sequence[nn.Module], generator: torch.Generator | None = None) -> None:
        self._generator = generator
        self._has_quantizers = bool(quantizers)
        for q in quantizers:
            q.selector = self.select

    def mix(self, x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        if self._entry_in_full and x is self._quant_input:
            return xq
        if x is self._unit_input and self._entry_mask is not None:
            return torch.where(self._entry_mask, xq, self._fp_input)
        return torch.where(self._rand(x) < self.config.prob, xq, x)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused path of ``mix``: which elements are quantized, and what the others take."""
        if self._entry_in_full and x is self._quant_input:
            return torch.ones(x.shape, dtype=torch.bool, device=x.device), None
        if x is self._unit_input and self._entry_mask is not None:
            return self._entry_mask, self._fp_input
        return self._quantize_mask(x), None

    def mix_unit_input(self, quant_input: torch.Tensor, fp_input: torch.Tensor | None) -> torch.Tensor:
        """The official ``input_prob`` mixing: one mask for the unit input, ``where(mask, quantized-model input,
        fp-model input)``, which every consumer of the input reads (a residual shortcut, a LayerNorm, a pooling
        before the head). A quantizer reading the input itself quantizes the masked elements and passes the
        others' full-precision values, with the same mask (so two layers reading the input agree)."""
        self._quant_input = self._unit_input = quant_input
        self._fp_input = self._entry_mask = None
        mixing = self.config.input_mixing and fp_input is not None and not self._entry_in_full
        if not mixing or not (self._has_quantizers or self.config.mix_weight_only_inputs):
            return quant_input
        mask = self._quantize_mask(quant_input)
        mixed = torch.where(mask, quant_input, fp_input)
        self._unit_input, self._fp_input, self._entry_mask = mixed, fp_input, mask
        return mixed

    def quantize_unit_entry(self, in_full: bool) -> None:
        """PD-Quant's prediction branch as released: the unit's quantized-model input (the one given to
        ``mix_unit_input``, unmixed) quantized in full, the drop inside the unit on (``block(cat(drop_inp,
        cur_inp))`` with every ``is_training`` still True)."""
        self._entry_in_full = in_full

    def end(self, quantizers: Sequence[nn.Module]) -> None:
        self._entry_in_full = False
        self._unit_input = self._fp_input = self._entry_mask = self._quant_input = None
        self._generator = None
        super().end(quantizers)


OFFICIAL = {"recon.iters": 20000, "recon.batch_size": 32, "calib.num_samples": 1024}

QDROP = RecipeSpec(
    name="qdrop",
    extends="brecq",
    description="QDrop: BRECQ's parts plus random dropping of activation quantization, steps learned jointly",
    overrides={
        "loss.name": "mse",
        "activation_policy.name": "drop",
        "activation_policy.options.prob": 0.5,
        "recon.order": "joint",
        "recon.learn_act_step": True,
        "recon.act_lr": 4e-5,
        **OFFICIAL,
    },
    presets={
        "official": OFFICIAL,
        "official-mobilenetv2": {**OFFICIAL, "rounding.options.reg_weight": 0.1},
        "cpu-fast": {"recon.iters": 2000, "calib.num_samples": 512, "recon.act_lr": 1e-4},
    },
    source="Wei et al., 'QDrop: Randomly Dropping Quantization for Extremely Low-bit PTQ', ICLR 2022",
)


@hookimpl
def register_activation_policies(register) -> None:  # type: ignore[no-untyped-def]
    register(DropPolicy)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(QDROP)
