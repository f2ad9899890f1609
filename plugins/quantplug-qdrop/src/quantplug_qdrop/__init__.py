"""QDrop: "Randomly Dropping Quantization for Extremely Low-bit Post-Training Quantization" (Wei et al., ICLR 2022).

BRECQ's parts (AdaRound rounding, block reconstruction) plus the ``drop`` activation policy: during
reconstruction every activation element is quantized with probability ``prob`` (0.5) and kept in full
precision otherwise, ``torch.where(rand < prob, x_q, x)`` (wimh966/QDrop). At the unit's input the
kept elements come from the full-precision model (the official ``input_prob`` mixing
``where(rand < p, quantized-model input, fp-model input)``). Activation step sizes are learned
jointly with the rounding (LSQ-style, Adam lr 4e-5, cosine decay); the loss is plain MSE as in the
released configs.

Where one tensor feeds two layers (a residual block's input feeds conv1 and the downsample), each
layer's input quantizer draws its own mask; in the official code one mask is drawn at the block
input. The expected fraction of quantized elements is the same.
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
        if self._entry_in_full and x is self._unit_input:
            return xq
        keep = x
        if self.config.input_mixing and x is self._unit_input and self._fp_input is not None:
            keep = self._fp_input
        return torch.where(self._rand(x) < self.config.prob, xq, keep)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused path of ``mix``: which elements are quantized, and what the others take."""
        if self._entry_in_full and x is self._unit_input:
            return torch.ones(x.shape, dtype=torch.bool, device=x.device), None
        keep = None
        if self.config.input_mixing and x is self._unit_input and self._fp_input is not None:
            keep = self._fp_input
        return self._quantize_mask(x), keep

    def mix_unit_input(self, quant_input: torch.Tensor, fp_input: torch.Tensor | None) -> torch.Tensor:
        self._unit_input, self._fp_input = quant_input, fp_input
        weight_only = not self._has_quantizers and self.config.mix_weight_only_inputs and self.config.input_mixing
        if weight_only and fp_input is not None and not self._entry_in_full:
            return torch.where(self._quantize_mask(quant_input), quant_input, fp_input)
        return quant_input

    def quantize_unit_entry(self, in_full: bool) -> None:
        """PD-Quant's prediction branch as released: the unit's (quantized-model) input quantized in full, the
        drop inside the unit on (``block(cat(drop_inp, cur_inp))`` with every ``is_training`` still True)."""
        self._entry_in_full = in_full

    def end(self, quantizers: Sequence[nn.Module]) -> None:
        self._entry_in_full = False
        self._unit_input = self._fp_input = None
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
