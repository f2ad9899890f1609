"""Quantization-aware fine-tuning of a whole fake-quantized model, started from any PTQ result.

Esser et al., "Learned Step Size Quantization" (ICLR 2020): weights through a straight-through round, step
sizes of weights and activations learned with a scaled gradient, cosine learning-rate decay. LSQ trains
with SGD (momentum 0.9) for 90 epochs; these short fine-tunes default to Adam, which moved the weights
and steps much further in the same number of steps (see the README's measurements); ``optimizer=sgd``
gives LSQ's optimizer.
The pass runs after calibration and reconstruction (stage ``quantized``):

1. every weight-quantized layer gets an ``LSQWeight`` (latent weight = its dequantized hard codes, step
   learnable); activation steps become learnable; biases and other float parameters are trained too;
2. the model is trained for ``epochs`` on the calibration set or ``num_samples`` samples of ``data`` with the
   adapter's task loss, mixed with distillation from the full-precision model when ``distill > 0``;
3. the integer codes are hardened again from the latent weights and learned steps (the layers' ``weight``
   becomes the latent weight), so the model saves, loads and exports like any PTQ result.

BatchNorm is folded before quantization, so the model is trained in eval mode (no BN statistics, no dropout).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.interfaces import ModelPass, PassContext
from quantplug.modules import QuantLayer, quant_layers
from quantplug.progress import progress_bar
from quantplug_qat.data import calibration_dataset, epoch_batches, source_dataset
from quantplug_qat.loss import qat_loss
from quantplug_qat.lsq import ActivationSteps, LSQWeight

logger = logging.getLogger(__name__)

INITS = ("codes", "float")
OPTIMIZERS = ("sgd", "adam")


def refuse_codebook_layers(model: nn.Module) -> None:
    """ConfigError when a layer holds lookup-table weights (k-means, TTQ): QAT trains affine codes only.

    Hardening would turn such a layer's codebook (Deep Compression's shared centroids, TTQ's ``{-W_n, 0, +W_p}``)
    into affine codes of its float weights, i.e. silently undo the PTQ method. Fine-tuning the codebook is what
    those methods' own passes do (Deep Compression's centroid fine-tuning, eq. 3; TTQ's scale and latent training).
    """
    names = [name for name, layer in quant_layers(model) if layer.has_codebook]
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ConfigError(
            f"qat fine-tunes affine integer codes, but {len(names)} layer(s) hold lookup-table (codebook) weights "
            f"from k-means or TTQ ({shown}); qat would replace the codebooks by affine codes. Fine-tune the "
            "codebook in its own pass instead (kmeans option `epochs`: Deep Compression's centroid fine-tuning; "
            "ttq options `epochs`, `learn_assignments`), or run qat on an affine PTQ result (e.g. --base nearest, "
            "qdrop, brecq, adaround)"
        )


class FakeQuantTraining:
    """Puts a hardened quantized model into a trainable state and back (``harden``); see the module docstring."""

    def __init__(self, model: nn.Module, *, init: str, learn_weight_step: bool, learn_act_step: bool) -> None:
        refuse_codebook_layers(model)
        self.model = model
        self.requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        self.layers: list[tuple[str, QuantLayer, LSQWeight]] = []
        self.codes_before: dict[str, torch.Tensor] = {}
        self.steps_before: dict[str, torch.Tensor] = {}
        self.learn_weight_step = learn_weight_step
        for name, layer in quant_layers(model):
            if not layer.quantizes_weight:
                continue
            if layer.weight_codes is not None:
                self.codes_before[name] = layer.weight_codes.clone()
            assert layer.weight_quantizer is not None
            self.steps_before[name] = layer.weight_quantizer.scale.detach().clone()
            rounder = LSQWeight(layer, init)
            rounder.weight_step.requires_grad_(learn_weight_step)
            layer.rounder = rounder
            self.layers.append((name, layer, rounder))
        quantizers = [layer.input_quantizer for _, layer in quant_layers(model)
                      if layer.input_quantizer is not None and layer.input_quantizer.active]
        self.activations = ActivationSteps(quantizers if learn_act_step else [])
        quantized_weights = {id(layer.weight) for _, layer, _ in self.layers}
        self.float_params = [p for p in model.parameters() if id(p) not in quantized_weights
                             and id(p) not in {id(r.weight_step) for _, _, r in self.layers}
                             and id(p) not in {id(s) for s in self.activations.params}
                             and id(p) not in {id(r.latent) for _, _, r in self.layers}]
        for p in self.float_params:
            p.requires_grad_(True)
        for _, layer, _ in self.layers:
            layer.weight.requires_grad_(False)

    def step_params(self) -> list[nn.Parameter]:
        steps = list(self.activations.params)
        if self.learn_weight_step:
            steps += [r.weight_step for _, _, r in self.layers]
        return steps

    def param_groups(self, lr: float, weight_decay: float, step_lr: float | None) -> list[dict[str, Any]]:
        """Weights (latent and float, ``dim > 1``) with weight decay; biases and step sizes without.

        ``step_lr`` (Adam): each step-size tensor gets its own group with ``lr = step_lr * mean(step)``, so an
        iteration changes a step by about ``step_lr`` of itself whatever its magnitude (Adam's update is about
        ``lr`` in absolute terms). None: the steps share ``lr`` (SGD with LSQ's gradient scale).
        """
        weights = [r.latent for _, _, r in self.layers] + [p for p in self.float_params if p.dim() > 1]
        biases = [p for p in self.float_params if p.dim() <= 1]
        groups: list[dict[str, Any]] = [{"params": weights, "lr": lr, "weight_decay": weight_decay},
                                         {"params": biases, "lr": lr, "weight_decay": 0.0}]
        steps = self.step_params()
        if step_lr is None:
            groups.append({"params": steps, "lr": lr, "weight_decay": 0.0})
        else:
            for step in steps:
                scale = float(step.detach().abs().mean())
                groups.append({"params": [step], "lr": step_lr * scale, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    def clamp_steps(self) -> None:
        self.activations.clamp_()
        with torch.no_grad():
            for _, _, r in self.layers:
                r.weight_step.clamp_(min=1e-8)

    @torch.no_grad()
    def harden(self) -> dict[str, Any]:
        """Integer codes from the latent weights and learned steps; everything frozen again."""
        changed = total = 0
        step_change: list[float] = []
        for name, layer, rounder in self.layers:
            scale, zero_point = rounder.final_qparams()
            codes = rounder.hard_codes()
            layer.weight.copy_(rounder.latent.detach())
            assert layer.weight_quantizer is not None
            layer.weight_quantizer.freeze_step()
            layer.weight_quantizer.set_qparams(scale, zero_point)
            layer.set_codes(codes)
            before = self.codes_before.get(name)
            if before is not None:
                changed += int((before.to(codes.dtype) != codes).sum())
                total += codes.numel()
            step_change.append(float(((scale / self.steps_before[name].to(scale.device)) - 1).abs().median()))
        self.activations.freeze()
        for p in self.model.parameters():
            p.requires_grad_(self.requires_grad.get(id(p), False))
        for _, layer in quant_layers(self.model):
            layer.invalidate_cache()
        return {
            "codes_changed": changed / total if total else 0.0,
            "median_weight_step_change": sorted(step_change)[len(step_change) // 2] if step_change else 0.0,
        }


class QATPass(ModelPass):
    """Quantization-aware fine-tuning (LSQ, Esser et al., ICLR 2020): STE weights, learned steps, from the PTQ result.

    Stage ``quantized``. Trains the whole fake-quantized model with the adapter's task loss (and optional
    distillation from the full-precision model), Adam (or LSQ's SGD) with cosine decay, then hardens the
    integer codes again. Data: the calibration set (default) or ``num_samples`` samples of ``data``.
    """

    name = "qat"
    stage = "quantized"

    @dataclass(frozen=True)
    class Config:
        epochs: int = 1
        lr: float = 1e-3
        batch_size: int = 64
        num_samples: int | None = None  # None: every sample (of the calibration set, or of `data`)
        data: str | None = None  # a data spec to train on (its train split); None: the calibration set
        optimizer: str = "adam"  # adam | sgd (LSQ's: momentum 0.9; needs far more steps, see the README)
        step_lr: float = 1e-2  # Adam: step sizes move by about this fraction of themselves per iteration
        momentum: float = 0.9
        weight_decay: float = 0.0
        distill: float = 0.0  # weight of distillation from the FP model (0: task loss only, 1: distillation only)
        temperature: float = 1.0
        learn_weight_step: bool = True
        learn_act_step: bool = True
        init: str = "codes"  # codes: start from the PTQ codes; float: from the full-precision weights
        log_every: int = 20

    def __init__(self, config: QATPass.Config | None = None) -> None:
        super().__init__(config)
        c = self.config
        if c.epochs < 1 or c.batch_size < 1 or not c.lr > 0 or not c.step_lr > 0:
            raise ConfigError("qat: epochs and batch_size must be >= 1, lr and step_lr > 0")
        if c.num_samples is not None and c.num_samples < 1:
            raise ConfigError("qat: num_samples must be >= 1 (or null for every sample)")
        if not 0.0 <= c.distill <= 1.0 or not c.temperature > 0:
            raise ConfigError("qat: distill must be in [0, 1] and temperature > 0")
        if c.init not in INITS:
            raise ConfigError(f"qat: init must be one of {', '.join(INITS)}; got {c.init!r}")
        if c.optimizer not in OPTIMIZERS:
            raise ConfigError(f"qat: optimizer must be one of {', '.join(OPTIMIZERS)}; got {c.optimizer!r}")
        if not 0.0 <= c.momentum < 1.0 or c.weight_decay < 0:
            raise ConfigError("qat: momentum must be in [0, 1) and weight_decay >= 0")

    def dataset(self, ctx: PassContext) -> torch.utils.data.Dataset:
        c = self.config
        if c.data:
            return source_dataset(ctx, c.data, c.num_samples, ctx.seed + 1)
        if c.distill < 1.0 and any(t is None for t in ctx.calib_targets):
            raise ConfigError("qat: the calibration data has no targets for the task loss; set distill=1 or `data`")
        return calibration_dataset(ctx.calib_inputs, ctx.calib_targets, c.num_samples)

    def run(self, model: nn.Module, ctx: PassContext) -> dict[str, Any]:
        c = self.config
        t0 = time.perf_counter()
        refuse_codebook_layers(model)  # before loading any data
        dataset = self.dataset(ctx)
        num_samples = len(dataset)  # type: ignore[arg-type]
        steps_per_epoch = math.ceil(num_samples / c.batch_size)
        total_steps = c.epochs * steps_per_epoch
        model.eval()
        state = FakeQuantTraining(model, init=c.init, learn_weight_step=c.learn_weight_step,
                                  learn_act_step=c.learn_act_step)
        optimizer: torch.optim.Optimizer
        if c.optimizer == "sgd":
            optimizer = torch.optim.SGD(state.param_groups(c.lr, c.weight_decay, None), lr=c.lr, momentum=c.momentum)
        else:
            optimizer = torch.optim.Adam(state.param_groups(c.lr, c.weight_decay, c.step_lr), lr=c.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=0.0)
        generator = torch.Generator().manual_seed(ctx.seed * 7919 + 17)
        epoch_losses: list[float] = []
        bar = progress_bar(range(total_steps), desc="qat", unit="step")
        step = 0
        try:
            with torch.enable_grad():
                for _ in range(c.epochs):
                    total, count = 0.0, 0
                    for batch in epoch_batches(dataset, c.batch_size, generator):
                        loss = self._step(model, ctx, batch, optimizer)
                        schedule.step()
                        state.clamp_steps()
                        total += loss * len(batch[0])
                        count += len(batch[0])
                        step += 1
                        bar.update(1)
                        if step % max(1, c.log_every) == 0:
                            bar.set_postfix(loss=f"{loss:.4g}")
                    epoch_losses.append(total / max(count, 1))
                    logger.info("qat epoch %d: loss %.4g", len(epoch_losses), epoch_losses[-1])
        finally:
            bar.close()
            hardening = state.harden()
        return {
            "epochs": c.epochs, "steps": total_steps, "samples": num_samples, "batch_size": c.batch_size,
            "lr": c.lr, "step_lr": c.step_lr, "optimizer": c.optimizer, "distill": c.distill,
            "data": c.data or "calibration", "epoch_losses": epoch_losses,
            "seconds": time.perf_counter() - t0, **hardening,
        }

    def _step(self, model: nn.Module, ctx: PassContext, batch: Any, optimizer: torch.optim.Optimizer) -> float:
        c = self.config
        inputs, targets = ctx.adapter.prepare_batch(batch, ctx.device)
        fp_outputs = None
        if c.distill > 0:
            with torch.no_grad():
                fp_outputs = ctx.adapter.forward(ctx.fp_model, inputs)
        outputs = ctx.adapter.forward(model, inputs)
        loss = qat_loss(ctx.adapter, outputs, targets, fp_outputs, c.distill, c.temperature)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"qat loss became {value}; lower the qat lr (now {c.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return value
