"""``quantplug.finetune``: task-loss fine-tuning of chosen parameters on the calibration batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantplug.errors import ConfigError
from quantplug.finetune import calibration_task_loss, finetune_task_loss
from quantplug.interfaces import PassContext
from quantplug.plugins import Session
from quantplug.recipes import resolve_recipe
from quantplug.testing.data import synthetic_images


def _context(session: Session, model: nn.Module) -> PassContext:
    data = synthetic_images(64, "train", 0)
    images, labels = data.tensors
    inputs, targets = list(images.split(32)), list(labels.split(32))
    adapter = session.adapter_for("testing:tiny-resnet")
    return PassContext(session, resolve_recipe(session, "nearest"), adapter, model, inputs, targets,
                       torch.device("cpu"), 3, "quantized")


def _model(session: Session) -> nn.Module:
    adapter = session.adapter_for("testing:tiny-resnet")
    return adapter.load("testing:tiny-resnet", device=torch.device("cpu")).eval()


def test_only_the_given_parameters_change_and_the_loss_drops() -> None:
    session = Session(entry_points=False)
    model = _model(session)
    ctx = _context(session, model)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():  # a wrong bias gives the fine-tuning something to fix
        last.bias.add_(torch.linspace(-3, 3, last.bias.numel()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    summary = finetune_task_loss(model, ctx, [{"params": [last.bias], "lr": 0.05}], epochs=5)
    assert model.training, "the model's mode is restored"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    bias_key = next(k for k, v in model.named_parameters() if v is last.bias)
    assert changed == {bias_key}
    assert summary.steps == 5 * len(ctx.calib_inputs) and len(summary.epoch_losses) == 5
    assert summary.loss_after < 0.8 * summary.loss_before
    model.eval()
    assert summary.loss_after == pytest.approx(calibration_task_loss(model, ctx))


def test_same_seed_same_result_and_zero_epochs_is_a_no_op() -> None:
    session = Session(entry_points=False)
    results = []
    for _ in range(2):
        model = _model(session)
        bias = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].bias
        finetune_task_loss(model, _context(session, model), [{"params": [bias], "lr": 0.05}], epochs=2)
        results.append(bias.detach().clone())
    assert torch.equal(results[0], results[1])
    model = _model(session)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    summary = finetune_task_loss(model, _context(session, model), [{"params": list(model.parameters())}], epochs=0)
    assert summary.steps == 0 and summary.loss_after == summary.loss_before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_bad_settings_raise_clear_errors() -> None:
    session = Session(entry_points=False)
    model = _model(session)
    ctx = _context(session, model)
    with pytest.raises(ConfigError, match="epochs"):
        finetune_task_loss(model, ctx, [], epochs=-1)
    ctx.calib_inputs, ctx.calib_targets = [], []
    with pytest.raises(ConfigError, match="calibration data"):
        finetune_task_loss(model, ctx, [], epochs=1)
