"""Conformance base classes for plugin authors (and for every built-in).

Subclass one in your test module and set the class attributes; pytest collects it when your class
name starts with ``Test``::

    from quantplug.testing.conformance import RoundingConformance
    from quantplug_myrounding import MyRounding

    class TestMyRounding(RoundingConformance):
        component = MyRounding
        options = {}

The checks are behavioural and numeric: shapes, grid membership, determinism, gradients, and a
quality floor (a learnable rounding must not end worse than nearest rounding on a small layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from quantplug.config import PerChannel, PerGroup, PerTensor, QuantSpec, Recipe
from quantplug.errors import DataError
from quantplug.interfaces import (
    GranularityScheduler,
    LossContext,
    ModelAdapter,
    Observer,
    ReconstructionLoss,
    ReconUnit,
    Rounding,
)
from quantplug.modules import QuantLinear
from quantplug.quantizer import fake_quant_rows, qparams_from_range, to_rows


def _calibrated_linear(bits: int = 4, seed: int = 0, out_features: int = 16, in_features: int = 32) -> QuantLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    layer = QuantLinear(linear, QuantSpec(bits, False, PerChannel(0)), None)
    rows = to_rows(layer.weight.detach(), layer.weight_spec)
    scale, zp = qparams_from_range(rows.min(1).values, rows.max(1).values, layer.weight_spec)
    layer.weight_quantizer.set_qparams(scale, zp)
    return layer


class RoundingConformance:
    component: ClassVar[type[Rounding]]
    options: ClassVar[Mapping[str, Any]] = {}
    #: iterations of the quality-floor check for learnable roundings
    floor_iters: ClassVar[int] = 300
    floor_lr: ClassVar[float] = 1e-2

    def make(self) -> Rounding:
        return self.component(self.component.make_config(self.options))

    def test_has_name_config_and_doc(self) -> None:
        assert self.component.name and self.component.name == self.component.name.lower()
        assert (self.component.__doc__ or "").strip(), "document the component and cite its source"
        self.make()

    def test_forward_shape_and_grid(self) -> None:
        layer = _calibrated_linear()
        rounder = self.make().attach(layer, generator=torch.Generator().manual_seed(0))
        w = rounder()
        assert w.shape == layer.weight.shape
        codes = rounder.hard_codes()
        assert codes.shape == layer.weight.shape
        spec = layer.weight_spec
        assert torch.equal(codes, codes.round()), "hard codes must be integers"
        assert codes.min() >= spec.qmin and codes.max() <= spec.qmax

    def test_hard_codes_within_one_step_of_weight(self) -> None:
        layer = _calibrated_linear()
        rounder = self.make().attach(layer, generator=torch.Generator().manual_seed(0))
        w_hard = layer.dequantize_codes(rounder.hard_codes())
        step = layer.weight_quantizer.scale[:, None]
        assert ((w_hard - layer.weight).abs() <= step * 1.0001).all()

    def test_deterministic_given_generator(self) -> None:
        a = self.make().attach(_calibrated_linear(), generator=torch.Generator().manual_seed(3)).hard_codes()
        b = self.make().attach(_calibrated_linear(), generator=torch.Generator().manual_seed(3)).hard_codes()
        assert torch.equal(a, b)

    def test_learnable_rounding_gets_gradients_and_beats_floor(self) -> None:
        layer = _calibrated_linear()
        if not self.component.learnable:
            rounder = self.make().attach(layer, generator=torch.Generator().manual_seed(0))
            assert not [p for p in rounder.parameters() if p.requires_grad], "non-learnable rounding has parameters"
            return
        torch.manual_seed(1)
        # correlated inputs: with white inputs nearest rounding is already optimal for the output error
        mixing = torch.eye(layer.in_features) + 0.3 * torch.randn(layer.in_features, layer.in_features)
        x = torch.randn(256, layer.in_features) @ mixing
        target = nn.functional.linear(x, layer.weight, layer.bias)
        with torch.no_grad():
            nearest = nn.functional.linear(x, layer.dequantize_codes(layer.nearest_codes()), layer.bias)
        nearest_loss = float((nearest - target).square().mean())
        rounder = self.make().attach(layer, generator=torch.Generator().manual_seed(0))
        params = [p for p in rounder.parameters() if p.requires_grad]
        assert params, "a learnable rounding must expose parameters"
        opt = torch.optim.Adam(params, lr=self.floor_lr)
        for it in range(self.floor_iters):
            rounder.step(it / self.floor_iters)
            out = nn.functional.linear(x, rounder(), layer.bias)
            loss = (out - target).square().mean()
            reg = rounder.regularization(it / self.floor_iters)
            total = loss if reg is None else loss + reg
            opt.zero_grad()
            total.backward()
            if it == 0:
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
            opt.step()
        with torch.no_grad():
            qparams = rounder.final_qparams()  # a rounding that learned its own grid hands it over
            codes = rounder.hard_codes()
            if qparams is not None:
                layer.weight_quantizer.set_qparams(*qparams)
            hard = nn.functional.linear(x, layer.dequantize_codes(codes), layer.bias)
        hard_loss = float((hard - target).square().mean())
        assert hard_loss <= nearest_loss * 1.02, f"learned {hard_loss:.4g} worse than nearest {nearest_loss:.4g}"


class ObserverConformance:
    component: ClassVar[type[Observer]]
    options: ClassVar[Mapping[str, Any]] = {}
    #: largest mean |x - q(x)| allowed on N(0,1) data at 8 bits, in units of the data std
    max_error_8bit: ClassVar[float] = 0.05

    def make(self, spec: QuantSpec) -> Observer:
        return self.component(spec, self.component.make_config(self.options))

    @pytest.mark.parametrize(
        "granularity,rows",
        [(PerTensor(), 1), (PerChannel(0), 8), (PerGroup(16), 8 * 64 // 16)],
    )
    @pytest.mark.parametrize("symmetric", [False, True])
    def test_shapes_and_ranges(self, granularity: Any, rows: int, symmetric: bool) -> None:
        spec = QuantSpec(8, symmetric, granularity)
        torch.manual_seed(0)
        x = torch.randn(8, 64)
        obs = self.make(spec)
        obs.observe(to_rows(x, spec))
        scale, zp = obs.compute()
        assert scale.shape == (rows,) and zp.shape == (rows,)
        assert (scale > 0).all() and torch.isfinite(scale).all()
        assert torch.equal(zp, zp.round()) and zp.min() >= spec.qmin and zp.max() <= spec.qmax
        if symmetric:
            assert (zp == 0).all()

    def test_quantization_error_is_small_at_8_bits(self) -> None:
        spec = QuantSpec(8, False, PerTensor())
        torch.manual_seed(0)
        x = torch.randn(4, 4096)
        obs = self.make(spec)
        for chunk in x:
            obs.observe(to_rows(chunk, spec), batch_size=1)
        scale, zp = obs.compute()
        err = (fake_quant_rows(x, scale, zp, spec) - x).abs().mean()
        assert float(err) < self.max_error_8bit

    def test_nan_raises_clear_error(self) -> None:
        spec = QuantSpec(8, False, PerTensor())
        obs = self.make(spec)
        x = torch.randn(1, 100)
        x[0, 5] = float("nan")
        with pytest.raises(DataError):
            obs.observe(x)
            obs.compute()

    def test_deterministic(self) -> None:
        spec = QuantSpec(4, False, PerChannel(0))
        x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
        results = []
        for _ in range(2):
            obs = self.make(spec)
            obs.observe(to_rows(x, spec))
            results.append(obs.compute())
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


class LossConformance:
    component: ClassVar[type[ReconstructionLoss]]
    options: ClassVar[Mapping[str, Any]] = {}

    def make(self) -> ReconstructionLoss:
        return self.component(self.component.make_config(self.options))

    def test_zero_on_identical_positive_otherwise_differentiable(self) -> None:
        loss = self.make()
        torch.manual_seed(0)
        target = torch.randn(4, 3, 5, 5)
        # losses that declare per-sample extras get all-ones tensors of the output's shape
        context = LossContext({k: torch.ones_like(target) for k in self.component.extra_keys})
        same = loss(target.clone(), target, context)
        assert same.dim() == 0 and float(same) == pytest.approx(0.0, abs=1e-6)
        out = (target + 0.1 * torch.randn_like(target)).requires_grad_(True)
        value = loss(out, target, context)
        assert float(value.detach()) > 0
        value.backward()
        assert out.grad is not None and out.grad.abs().sum() > 0


def _tiny_blocks() -> list[list[Any]]:
    from quantplug.testing.models import tiny_decoder, tiny_resnet

    return [tiny_resnet().quant_blocks(), tiny_decoder().quant_blocks()]


class SchedulerConformance:
    component: ClassVar[type[GranularityScheduler]]
    options: ClassVar[Mapping[str, Any]] = {}

    def make(self) -> GranularityScheduler:
        return self.component(self.component.make_config(self.options))

    @pytest.mark.parametrize("which", [0, 1])
    def test_plan_covers_every_layer_once_in_order(self, which: int) -> None:
        blocks = _tiny_blocks()[which]
        plan = self.make().plan(blocks)
        assert plan and all(isinstance(u, ReconUnit) for u in plan)
        order = {b.name: i for i, b in enumerate(blocks)}
        layers: list[str] = []
        last_block = -1
        for unit in plan:
            if unit.layer is not None:
                layers.append(unit.layer)
                continue
            idx = [order[b] for b in unit.blocks]
            assert idx == list(range(idx[0], idx[0] + len(idx))), "a unit must hold adjacent blocks"
            assert idx[0] > last_block, "units must follow forward order"
            last_block = idx[-1]
            layers += [name for b in unit.blocks for name in blocks[order[b]].layers]
        expected = [name for b in blocks for name in b.layers]
        assert sorted(layers) == sorted(expected)
        assert len(layers) == len(set(layers))


class AdapterConformance:
    component: ClassVar[type[ModelAdapter]]
    model_id: ClassVar[str]
    data: ClassVar[str | None] = None
    num_samples: ClassVar[int] = 8

    def make(self) -> ModelAdapter:
        return self.component()

    def _model_and_batch(self) -> tuple[nn.Module, Any, Any]:
        from quantplug.plugins import Session

        adapter = self.make()
        model = adapter.fold_batchnorm(adapter.load(self.model_id, device=torch.device("cpu")).eval())
        session = Session(entry_points=True)
        spec = self.data or adapter.default_data(self.model_id)
        assert spec is not None, "set `data` on the conformance class"
        ds = session.data_source_for(spec).load(spec, "test", num_samples=self.num_samples, seed=0)
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=self.num_samples)))
        inputs, targets = adapter.prepare_batch(batch, torch.device("cpu"))
        return model, inputs, targets

    def test_can_load_its_id(self) -> None:
        assert self.make().can_load(self.model_id)

    @torch.no_grad()
    def test_blocks_form_a_chain_equal_to_forward(self) -> None:
        adapter = self.make()
        model, inputs, _ = self._model_and_batch()
        blocks = adapter.blocks(model)
        assert blocks
        x = inputs
        for block in blocks:
            x = adapter.block_module(model, block)(x)
        ref = adapter.forward(model, inputs)
        assert torch.allclose(x, ref, atol=1e-5, rtol=1e-4)

    def test_layers_are_quantizable_and_first_last_known(self) -> None:
        adapter = self.make()
        model, _, _ = self._model_and_batch()
        names = adapter.quantizable_layers(model)
        assert names
        for n in names:
            assert isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear))
        in_blocks = {layer for b in adapter.blocks(model) for layer in b.layers}
        assert set(names) <= in_blocks, "every quantized layer must belong to a block"
        first, last = adapter.first_last_layers(model)
        assert first is None or first in names, f"first layer {first!r} is not a quantizable layer"
        assert last is None or last in names, f"last layer {last!r} is not a quantizable layer"

    @torch.no_grad()
    def test_metrics_and_task_loss(self) -> None:
        adapter = self.make()
        model, inputs, targets = self._model_and_batch()
        outputs = adapter.forward(model, inputs)
        sums = adapter.metrics(outputs, targets)
        final = adapter.finalize_metrics(sums)
        assert final and all(isinstance(v, float) for v in final.values())
        assert torch.isfinite(adapter.task_loss(outputs, targets))


class RecipeSmoke:
    """Runs a registered recipe end to end on a tiny model with few iterations and checks a quality floor."""

    recipe: ClassVar[str]
    model_id: ClassVar[str] = "testing:tiny-resnet"
    overrides: ClassVar[Mapping[str, Any]] = {"recon.iters": 20, "calib.num_samples": 64, "calib.batch_size": 32}
    base: ClassVar[str | None] = None
    #: the quantized top-1 (W4A8) may not fall more than this many points below full precision
    max_drop: ClassVar[float] = 20.0

    def test_recipe_runs_and_meets_floor(self, tmp_path: Any) -> None:
        from quantplug.api import apply
        from quantplug.plugins import Session

        session = Session(entry_points=True)
        overrides = {"weight.bits": 4, "activation.bits": 8, **self.overrides}
        result = apply(self.recipe, self.model_id, base=self.base, overrides=overrides, eval_samples=200,
                       out_dir=str(tmp_path / "run"), session=session)
        assert isinstance(result.recipe, Recipe)
        key = next(iter(result.fp_metrics))
        assert result.quant_metrics[key] >= result.fp_metrics[key] - self.max_drop
        self.check_reload(session, result.model, str(tmp_path / "run"))

    def check_reload(self, session: Any, model: nn.Module, run_dir: str) -> None:
        """The saved run reloads (``quantplug.export.load``) to outputs identical to the quantized model's on a
        test batch of the run's data."""
        from quantplug.export import load, read_manifest

        manifest = read_manifest(run_dir)
        adapter = session.adapter_for(self.model_id)
        data = session.model_data(self.model_id, manifest["data"], "test", num_samples=8)
        batch = next(iter(torch.utils.data.DataLoader(data, batch_size=8)))
        device = next(model.parameters()).device
        inputs, _ = adapter.prepare_batch(batch, device)
        reloaded = load(run_dir, device=device, session=session)
        model.eval()
        with torch.no_grad():
            expected, got = adapter.forward(model, inputs), adapter.forward(reloaded, inputs)
        assert torch.equal(got, expected), (
            f"{run_dir} reloads with other outputs (max |diff| {(got - expected).abs().max().item():.3g})")


class ModelPassConformance:
    """Checks for a ``ModelPass``: declared stage, JSON-able summary, a run through ``apply``, and (for
    ``float`` passes, whose changes the full-precision reference inherits) an unchanged network function.

    Set ``component`` and optionally ``options``, ``model_id``, ``overrides`` and ``base``.
    """

    component: ClassVar[type[Any]]
    options: ClassVar[Mapping[str, Any]] = {}
    model_id: ClassVar[str] = "testing:tiny-resnet"
    base: ClassVar[str] = "nearest"
    overrides: ClassVar[Mapping[str, Any]] = {"calib.num_samples": 64, "calib.batch_size": 32}
    #: relative output change a ``float`` pass may cause (equalization is exact up to rounding)
    float_tolerance: ClassVar[float] = 1e-4

    def make(self) -> Any:
        return self.component(self.component.make_config(self.options))

    def test_has_name_stage_config_and_doc(self) -> None:
        from quantplug.interfaces import PASS_STAGES

        cls = self.component
        assert cls.name and cls.name == cls.name.lower()
        assert cls.stage in PASS_STAGES
        assert (cls.__doc__ or "").strip()
        self.make()

    def test_runs_in_apply_and_summary_is_json(self, tmp_path: Any) -> None:
        import json

        from quantplug.api import apply
        from quantplug.plugins import Session

        session = Session(entry_points=True)
        if self.component.name not in session.model_passes:
            session.model_passes.register(self.component, "conformance")
        overrides = {**self.overrides, "passes": [{"name": self.component.name, "options": dict(self.options)}]}
        result = apply(self.base, self.model_id, overrides=overrides, eval_samples=64,
                       out_dir=str(tmp_path / "run"), session=session)
        assert self.component.name in result.passes
        json.dumps(result.passes[self.component.name])
        manifest = json.loads((tmp_path / "run" / "quantplug.json").read_text())
        assert self.component.name in manifest["passes"]

    @torch.no_grad()
    def test_float_pass_keeps_the_function(self) -> None:
        if self.component.stage != "float":
            pytest.skip("only float-stage passes must keep the network's function")
        import copy

        from quantplug.interfaces import PassContext
        from quantplug.plugins import Session

        session = Session(entry_points=True)
        adapter = session.adapter_for(self.model_id)
        model = adapter.fold_batchnorm(adapter.load(self.model_id, device=torch.device("cpu")).eval())
        spec = adapter.default_data(self.model_id)
        assert spec is not None
        ds = session.data_source_for(spec).load(spec, "train", num_samples=32, seed=0)
        inputs, targets = next(iter(torch.utils.data.DataLoader(ds, batch_size=32)))
        before = adapter.forward(model, inputs)
        changed = copy.deepcopy(model)
        ctx = PassContext(session, Recipe(), adapter, changed, [inputs], [targets], torch.device("cpu"), 0, "float")
        self.make().run(changed, ctx)
        after = adapter.forward(changed, inputs)
        assert torch.allclose(after, before, atol=self.float_tolerance * before.abs().max().item(), rtol=0)
