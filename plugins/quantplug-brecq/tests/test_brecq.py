"""BRECQ: Fisher-diagonal loss maths, gradient capture, recipe composition; conformance."""

from __future__ import annotations

import pytest
import torch
from quantplug_brecq import FisherDiagLoss, _kl_task_loss

from quantplug.plugins import Session
from quantplug.recipes import resolve_recipe
from quantplug.testing.conformance import LossConformance, RecipeSmoke


def test_fisher_loss_by_hand() -> None:
    from quantplug.interfaces import LossContext

    out = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    tgt = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    g = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    # per sample: sum_c (d^2 g^2) = 1*1 + 4*4 = 17 ; 1*9 + 9*1 = 18 ; mean = 17.5
    assert float(FisherDiagLoss()(out, tgt, LossContext({"grad": g}))) == pytest.approx(17.5)


def test_kl_task_loss_zero_when_equal_and_matches_formula() -> None:
    a = torch.randn(4, 10)
    assert float(_kl_task_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    b = torch.randn(4, 10)
    p = torch.softmax(b, 1)
    expected = (p * (torch.log(p) - torch.log_softmax(a, 1))).sum() / 32  # the released code's batch of 32
    assert float(_kl_task_loss(a, b)) == pytest.approx(float(expected), rel=1e-5)


def test_a_samples_gradient_does_not_depend_on_its_calibration_batch() -> None:
    """The last, partial calibration batch (or a batch size other than 32) must not scale a sample's weight."""
    q = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    fp = torch.randn(16, 10, generator=torch.Generator().manual_seed(1))
    grads = []
    for rows in (slice(0, 16), slice(0, 3)):  # the same first sample in a batch of 16 and in one of 3
        x = q[rows].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_kl_task_loss(x, fp[rows]), x)
        grads.append(grad[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_brecq_recipe_resolves_to_papers_parts() -> None:
    s = Session()
    r = resolve_recipe(s, "brecq")
    assert (r.rounding.name, r.scheduler.name, r.loss.name, r.recon.order) == (
        "adaround", "block", "fisher_diag", "weights_first")
    assert r.recon.iters == 20000 and r.calib.num_samples == 1024 and r.recon.act_lr == 4e-4
    assert r.weight.granularity.kind == "per_channel" and r.weight_observer.name == "mse"
    assert resolve_recipe(s, "brecq", preset="official-mobilenetv2").rounding.options["reg_weight"] == 0.1


def test_fisher_extras_are_damped_gradients_and_reconstruction_improves(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from quantplug.api import apply

    result = apply("brecq", "testing:tiny-resnet", session=Session(), eval_samples=200,
                   overrides={"weight.bits": 3, "activation.bits": 4, "recon.iters": 200, "recon.act_iters": 50,
                              "calib.num_samples": 128, "calib.batch_size": 64, "recon.lr": 3e-2})
    weights = [r for r in result.records if r.pass_name == "weights"]
    assert weights and sum(r.loss_after < r.loss_before for r in weights) >= len(weights) - 1


class TestFisherDiagConformance(LossConformance):
    component = FisherDiagLoss


class TestBRECQRecipe(RecipeSmoke):
    recipe = "brecq"
    overrides = {"recon.iters": 20, "recon.act_iters": 10, "calib.num_samples": 64, "calib.batch_size": 32}
