"""PD-Quant's distribution correction ``distribution_correction`` (Liu et al., CVPR 2023, Eq. 6).

As in the released code (hustvl/PD-Quant, ``quant/data_utils.py``, ``GetDcFpLayerInpOut``), for each
batch of a unit's calibration inputs ``A`` an input ``A_dc`` (initialized at ``A``) is optimized with
Adam (lr ``bn_lr`` = 1e-3, ``ReduceLROnPlateau(min_lr=1e-5, patience=100)`` on the total loss, 500 steps)::

    sum over BN layers l of the full-precision unit:
        || mu_l - mean_hw(y_l) ||^2 / B + || sqrt(var_l + 1e-6) - sqrt(var_hw(y_l) + 1e-6) ||^2 / B
    + lp_loss(A_dc, A) / lambda_c            (lp_loss = (A_dc - A)^2 summed over dim 1, averaged over the rest)

``y_l`` is the input of BN layer ``l`` (the pre-BN convolution output) computed from ``A_dc``; its mean
and (unbiased) variance are taken per sample and per channel over the spatial positions (the code's
``view(B, C, -1)``; ``statistics='batch'`` pools the batch too, as BN does in training); ``mu_l`` and
``var_l`` are BN's running statistics. A larger ``lambda_c`` weakens the anchor (weight ``1 / lambda_c``).

quantplug folds BN into the convolution, so the folded conv computes
``f = gamma * (y - mu) / s + beta`` with ``s = sqrt(var + bn_eps)``; the recorded statistics
(``model.quantplug_bn_stats``) turn it back into ``y = (f - beta) * s / gamma + mu`` and the loss is
evaluated on ``y`` exactly as in the code (same scale, so ``lambda_c`` keeps its meaning). Matching
``mean(y) = mu`` is ``mean(f) = beta``; matching ``std(y) = sqrt(var + 1e-6)`` is
``std(f) = |gamma| * sqrt(var + 1e-6) / s`` (about ``|gamma|``). Channels with ``gamma = 0`` carry no
information about the input and are left out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.engine import unit_layers, unit_module
from quantplug.errors import ConfigError
from quantplug.interfaces import DataTransform, ReconUnit

__all__ = [
    "BNTarget",
    "DistributionCorrection",
    "correct_inputs",
    "statistics_loss",
    "statistics_distance",
    "unit_bn_targets",
]

logger = logging.getLogger(__name__)

_GAMMA_TINY = 1e-12


@dataclass
class BNTarget:
    """The folded BN of one convolution: running statistics and affine terms, with the un-folding map."""

    name: str
    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    bn_eps: float

    @classmethod
    def from_stats(cls, name: str, stats: Mapping[str, Any]) -> BNTarget:
        mean = torch.as_tensor(stats["mean"]).detach().float()
        var = torch.as_tensor(stats["var"]).detach().float()
        weight, bias = stats.get("weight"), stats.get("bias")
        gamma = torch.ones_like(mean) if weight is None else torch.as_tensor(weight).detach().float()
        beta = torch.zeros_like(mean) if bias is None else torch.as_tensor(bias).detach().float()
        return cls(name, mean, var, gamma, beta, float(stats.get("eps", 1e-5)))

    def to(self, device: torch.device) -> BNTarget:
        return BNTarget(self.name, self.mean.to(device), self.var.to(device), self.gamma.to(device),
                        self.beta.to(device), self.bn_eps)

    @property
    def valid(self) -> torch.Tensor:
        """Channels whose folded output still depends on the input (``gamma != 0``)."""
        return self.gamma.abs() > _GAMMA_TINY

    def prebn(self, folded: torch.Tensor) -> torch.Tensor:
        """The pre-BN convolution output ``y`` from the folded output ``f`` (``[B, C, ...]``)."""
        shape = (1, -1) + (1,) * (folded.dim() - 2)
        s = torch.sqrt(self.var + self.bn_eps)
        scale = torch.where(self.valid, s / torch.where(self.valid, self.gamma, torch.ones_like(self.gamma)),
                            torch.zeros_like(s))
        return (folded - self.beta.view(shape)) * scale.view(shape) + self.mean.view(shape)


def unit_bn_targets(run: Any, unit: ReconUnit) -> list[tuple[nn.Module, BNTarget]]:
    """The unit's convolutions (in ``run.fp_model``) that had a BN folded into them, with its statistics."""
    stats: Mapping[str, Mapping[str, Any]] = getattr(run.fp_model, "quantplug_bn_stats", {}) or {}
    out = []
    for name in unit_layers(run, unit):
        if name not in stats:
            continue
        module = run.fp_model.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            out.append((module, BNTarget.from_stats(name, stats[name])))
    return out


def statistics_loss(prebn: torch.Tensor, target: BNTarget, statistics: str = "sample",
                    eps: float = 1e-6) -> torch.Tensor:
    """Mean plus std mismatch of one BN input ``prebn`` ``[B, C, H, W]`` against the running statistics."""
    b, c = prebn.shape[:2]
    mask = target.valid.to(prebn.dtype)
    target_std = torch.sqrt(target.var + eps)
    if statistics == "sample":
        flat = prebn.reshape(b, c, -1)
        loss = ((target.mean - flat.mean(2)).square() * mask).sum() / b
        if flat.shape[2] > 1:  # one spatial position has no variance
            std = torch.sqrt(flat.var(2) + eps)
            loss = loss + ((target_std - std).square() * mask).sum() / b
        return loss
    if statistics == "batch":
        flat = prebn.transpose(0, 1).reshape(c, -1)
        std = torch.sqrt(flat.var(1) + eps)
        return ((target.mean - flat.mean(1)).square() * mask).sum() + ((target_std - std).square() * mask).sum()
    raise ConfigError(f"distribution_correction statistics must be 'sample' or 'batch', got {statistics!r}")


def _anchor(x: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The official ``lp_loss(x, original)``: squared error summed over dimension 1, averaged over the rest."""
    err = (x - original).square()
    return err.sum(1).mean() if err.dim() > 1 else err.mean()


class _Capture:
    """Forward hooks storing the outputs of the hooked convolutions during one forward."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self.outputs[i] = output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _stat_total(capture: _Capture, targets: Sequence[BNTarget], statistics: str, eps: float) -> torch.Tensor:
    total: torch.Tensor | None = None
    for out, target in zip(capture.outputs, targets):
        if out is None:
            raise RuntimeError(f"convolution {target.name} did not run in the unit's forward pass")
        term = statistics_loss(target.prebn(out), target, statistics, eps)
        total = term if total is None else total + term
    assert total is not None
    return total


def statistics_distance(module: nn.Module, convs: Sequence[tuple[nn.Module, BNTarget]], inputs: torch.Tensor,
                        statistics: str = "sample", eps: float = 1e-6) -> float:
    """The statistics part of the objective for ``inputs`` (no gradient): how far the BN inputs are off."""
    targets = [t.to(inputs.device) for _, t in convs]
    capture = _Capture([m for m, _ in convs])
    try:
        with torch.no_grad():
            module(inputs)
            return float(_stat_total(capture, targets, statistics, eps))
    finally:
        capture.remove()


def correct_inputs(module: nn.Module, convs: Sequence[tuple[nn.Module, BNTarget]], inputs: torch.Tensor,
                   config: DistributionCorrection.Config) -> torch.Tensor:
    """Optimize one batch of ``module``'s inputs (see the module docstring); ``module``'s parameters stay frozen."""
    if not convs or config.steps <= 0:
        return inputs
    original = inputs.detach()
    targets = [t.to(original.device) for _, t in convs]
    frozen = [p for p in module.parameters() if p.requires_grad]
    was_training = module.training
    capture = _Capture([m for m, _ in convs])
    for p in frozen:
        p.requires_grad_(False)
    module.eval()
    first = last = float("nan")
    try:
        with torch.enable_grad():
            x = original.clone().requires_grad_(True)
            opt = torch.optim.Adam([x], lr=config.lr)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=config.min_lr, patience=config.patience)
            for step in range(config.steps):
                opt.zero_grad(set_to_none=True)
                module(x)
                stat = _stat_total(capture, targets, config.statistics, config.eps)
                total = stat + _anchor(x, original) / config.lambda_c
                total.backward()
                opt.step()
                value = float(total.detach())
                sched.step(value)
                if step == 0:
                    first = float(stat.detach())
                last = float(stat.detach())
    finally:
        capture.remove()
        for p in frozen:
            p.requires_grad_(True)
        module.train(was_training)
    logger.debug("distribution correction over %d BN layers: statistics loss %.4g -> %.4g", len(convs), first, last)
    return x.detach()


class DistributionCorrection(DataTransform):
    """PD-Quant's distribution correction (Liu et al., CVPR 2023): inputs moved toward the BN running statistics.

    Each batch of the unit's cached inputs is optimized (Adam, ``steps`` steps) so that the pre-BN outputs
    of the unit's convolutions in the full-precision model match the BN running mean / std, anchored to
    the original input by ``lp_loss / lambda_c`` (hustvl/PD-Quant ``quant/data_utils.py``). Units without a
    folded BN (the head) are left unchanged.
    """

    name = "distribution_correction"
    applies_to = "fp_inputs"  # official: the fp block input is corrected and the fp target recomputed from it

    @dataclass(frozen=True)
    class Config:
        lambda_c: float = 0.02  # ResNet; RegNet 0.01, MobileNetV2 0.005, MnasNet 0.001 (run_script.py)
        steps: int = 500  # GetDcFpLayerInpOut: iters = 500
        lr: float = 1e-3  # main_imagenet.py --bn_lr
        min_lr: float = 1e-5  # ReduceLROnPlateau(min_lr=1e-5, patience=100)
        patience: int = 100
        eps: float = 1e-6  # added to both variances before the square root (GetDcFpLayerInpOut.eps)
        statistics: str = "sample"  # sample: per sample and channel (official) | batch: per channel over the batch

    def __init__(self, config: DistributionCorrection.Config | None = None) -> None:
        super().__init__(config)
        c = self.config
        if not c.lambda_c > 0:
            raise ConfigError(f"distribution_correction lambda_c must be positive (the anchor is divided by it), "
                              f"got {c.lambda_c}")
        if c.steps < 0 or not c.lr > 0:
            raise ConfigError("distribution_correction needs steps >= 0 and lr > 0")
        if c.statistics not in ("sample", "batch"):
            raise ConfigError(f"distribution_correction statistics must be 'sample' or 'batch', got {c.statistics!r}")
        self._warned = False

    def apply(self, run: Any, unit: ReconUnit, inputs: torch.Tensor) -> torch.Tensor:
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            return inputs
        convs = unit_bn_targets(run, unit)
        if not convs:
            if not getattr(run.fp_model, "quantplug_bn_stats", None) and not self._warned:
                logger.warning("distribution correction: the model has no folded BN statistics; inputs unchanged")
                self._warned = True
            return inputs
        module = unit_module(run, run.fp_model, unit)
        return correct_inputs(module, convs, inputs, self.config).to(inputs.dtype)
