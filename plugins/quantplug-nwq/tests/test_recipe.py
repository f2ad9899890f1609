"""The nwq recipe: its slots and presets, and an engine run in which the temperature and the mixup ratio
follow their schedules and the loss's hooks come off afterwards."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import pytest
import torch
from quantplug_nwq import AnnealingMixupPolicy, AnnealingSoftmaxRounding, fp_probability_at, temperature_at
from quantplug_nwq.rounding import AnnealingSoftmaxRounder

from quantplug.api import apply
from quantplug.plugins import Session
from quantplug.recipes import resolve_recipe
from quantplug.testing.conformance import RecipeSmoke

os.environ.setdefault("QUANTPLUG_PROGRESS", "0")
torch.set_num_threads(1)


def test_nwq_recipe_slots_and_presets() -> None:
    session = Session()
    r = resolve_recipe(session, "nwq")
    assert (r.rounding.name, r.scheduler.name, r.loss.name, r.activation_policy.name) == (
        "annealing-softmax", "network", "activation-regularization", "annealing-mixup")
    assert r.recon.order == "joint" and r.recon.learn_act_step and r.recon.act_lr == 4e-5
    assert (r.recon.iters, r.recon.batch_size, r.calib.num_samples, r.recon.lr) == (20000, 32, 1024, 1e-3)
    fast = resolve_recipe(session, "nwq", preset="cpu-fast")
    assert (fast.recon.iters, fast.calib.num_samples) == (2000, 512)
    assert resolve_recipe(session, "nwq", preset="official").to_dict() == r.to_dict()


class TestNWQRecipe(RecipeSmoke):
    recipe = "nwq"


class _SpyRounder(AnnealingSoftmaxRounder):
    seen: ClassVar[list[float]] = []

    def forward(self) -> torch.Tensor:
        if self.layer[0].weight.requires_grad is False and torch.is_grad_enabled():
            self.seen.append(self.tau)
        return super().forward()


class _SpyRounding(AnnealingSoftmaxRounding):
    """Annealing softmax that records the temperature of every training forward pass (test only)."""

    name = "annealing-softmax-spy"

    def attach(self, layer: torch.nn.Module, *, generator: torch.Generator | None = None) -> Any:
        return _SpyRounder(layer, self.config)  # type: ignore[arg-type]


class _SpyMixup(AnnealingMixupPolicy):
    """Annealing mixup that records p(t) at every step (test only)."""

    name = "annealing-mixup-spy"
    seen: ClassVar[list[float]] = []

    def step(self, progress: float) -> None:
        super().step(progress)
        self.seen.append(self.fp_prob)


def test_engine_anneals_temperature_and_mixup_and_cleans_up(tmp_path: Any) -> None:
    session = Session(entry_points=True)
    session.registry("rounding").register(_SpyRounding, "test")
    session.registry("activation_policy").register(_SpyMixup, "test")
    _SpyRounder.seen.clear()
    _SpyMixup.seen.clear()
    iters = 20
    result = apply("nwq", "testing:tiny-resnet", session=session, eval_samples=64, out_dir=str(tmp_path / "run"),
                   overrides={"rounding.name": "annealing-softmax-spy", "activation_policy.name": "annealing-mixup-spy",
                              "recon.iters": iters, "calib.num_samples": 32, "calib.batch_size": 32,
                              "weight.bits": 2, "activation.bits": 4})
    progress = [i / iters for i in range(iters)]
    assert _SpyMixup.seen == pytest.approx([fp_probability_at(p, 0.5, 0.8) for p in progress])
    assert _SpyMixup.seen[0] == 0.5 and _SpyMixup.seen[-1] == 0.0
    layers = len(result.records[0].layers)
    taus = _SpyRounder.seen[::layers]  # every quantized layer's rounder runs once per iteration
    assert len(_SpyRounder.seen) == layers * iters
    assert taus == pytest.approx([temperature_at(p, 1.0, 0.01) for p in progress])
    record = result.records[0]
    assert record.name == "network" and record.loss_after < record.loss_before
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in result.model.modules())
    assert hooks == 0
