"""Reconstruction engine on the tiny models: losses, schedulers, caches, bit policy, resume."""

from __future__ import annotations

import sys

import pytest
import torch

from quantplug import hookimpl
from quantplug.api import apply, build_quant_model
from quantplug.bn_fold import fold_batchnorm
from quantplug.config import ComponentRef
from quantplug.errors import ConfigError, DataError
from quantplug.interfaces import DataSource
from quantplug.modules import QuantLayer, quant_layers
from quantplug.testing.models import tiny_resnet


def test_learned_rounding_lowers_each_units_loss_below_nearest(session, fast) -> None:  # type: ignore[no-untyped-def]
    for scheduler in ("layer", "block"):
        result = apply("soft-offset", "testing:tiny-resnet", session=session, eval_samples=100,
                       overrides={**fast, "weight.bits": 3, "activation": None, "scheduler.name": scheduler})
        assert result.records and all(r.iters == 300 for r in result.records)
        for r in result.records:
            assert r.loss_after < r.loss_before, (scheduler, r)
            assert r.cpu_seconds is not None and 0 < r.cpu_seconds  # 300 steps take processor time


def test_learned_activation_steps_lower_block_losses(session, fast) -> None:  # type: ignore[no-untyped-def]
    result = apply("nearest-lsq", "testing:tiny-resnet", session=session, eval_samples=100,
                   overrides={**fast, "weight.bits": 4, "activation.bits": 3, "recon.iters": 150})
    improved = [r.loss_after < r.loss_before for r in result.records]
    assert sum(improved) >= len(improved) - 1, result.records


def test_nearest_recipe_does_not_train(session, fast) -> None:  # type: ignore[no-untyped-def]
    result = apply("nearest", "testing:tiny-resnet", session=session, overrides=fast, eval_samples=100)
    assert all(r.iters == 0 for r in result.records)
    assert all(r.loss_after == pytest.approx(r.loss_before) for r in result.records)


def test_transformer_decoder_reconstructs(session, fast) -> None:  # type: ignore[no-untyped-def]
    result = apply("soft-offset", "testing:tiny-decoder", session=session, eval_samples=64,
                   overrides={**fast, "weight.bits": 3, "activation": None, "recon.iters": 100})
    assert [r.name for r in result.records] == ["layers.0", "layers.1", "head"]
    assert all(r.loss_after < r.loss_before for r in result.records)
    assert result.quant_metrics["perplexity"] < 2 * result.fp_metrics["perplexity"]


@pytest.mark.parametrize("cache", ["fp16", "disk"])
def test_cache_modes_match_fp32(session, fast, cache: str) -> None:  # type: ignore[no-untyped-def]
    over = {**fast, "weight.bits": 3, "activation": None, "recon.iters": 50}
    ref = apply("soft-offset", "testing:tiny-resnet", session=session, overrides=over, eval_samples=200)
    other = apply("soft-offset", "testing:tiny-resnet", session=session, overrides={**over, "recon.cache": cache},
                  eval_samples=200)
    assert abs(ref.quant_metrics["top1"] - other.quant_metrics["top1"]) <= 2.0
    for a, b in zip(ref.records, other.records):
        assert a.loss_after == pytest.approx(b.loss_after, rel=0.05)
    assert "disk" not in cache or "on disk" in other.memory


def test_memory_estimate_scales_with_samples_and_halves_with_fp16(session) -> None:  # type: ignore[no-untyped-def]
    def estimate(n: int, cache: str) -> str:
        return apply("soft-offset", session=session, dry_run=True,
                     overrides={"calib.num_samples": n, "recon.cache": cache}).memory

    # largest unit: a layer1 block, 8x16x16 in and out, 16 KiB per sample in fp32
    assert estimate(128, "cpu") == "reconstruction cache: up to 2.0 MiB in RAM (cpu)"
    assert estimate(256, "cpu") == "reconstruction cache: up to 4.0 MiB in RAM (cpu)"
    assert estimate(256, "fp16") == "reconstruction cache: up to 2.0 MiB in RAM (fp16)"


def test_resume_after_interrupt_gives_identical_result(session, fast, tmp_path) -> None:  # type: ignore[no-untyped-def]
    over = {**fast, "weight.bits": 3, "activation.bits": 4, "recon.iters": 40}
    full = apply("soft-offset", session=session, overrides=over, out_dir=str(tmp_path / "full"), eval_samples=100)

    class Interrupt:
        calls = 0

        @hookimpl
        def on_unit_end(self, run, unit, record):  # type: ignore[no-untyped-def]
            Interrupt.calls += 1
            if Interrupt.calls == 2:
                raise KeyboardInterrupt

    stopper = Interrupt()
    session.pm.register(stopper)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        apply("soft-offset", session=session, overrides=over, out_dir=str(out), eval_samples=100)
    assert not out.exists(), "an interrupted run must not leave an output directory"
    assert (tmp_path / "resumed.checkpoint" / "checkpoint.pt").exists()
    session.pm.unregister(stopper)
    resumed = apply("soft-offset", session=session, overrides=over, out_dir=str(out), eval_samples=100, resume=True)
    assert [r.loss_after for r in resumed.records] == [r.loss_after for r in full.records]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed.checkpoint").exists()


def test_bn_folding_preserves_outputs() -> None:
    model = tiny_resnet(0)
    with torch.no_grad():  # non-trivial statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), ref, atol=1e-5)


def test_bit_policy_first_last_and_overrides(session) -> None:  # type: ignore[no-untyped-def]
    from quantplug.recipes import resolve_recipe

    recipe = resolve_recipe(session, "nearest", overrides={
        "weight.bits": 2, "activation.bits": 4, "bits.overrides": [["layer1.1.*", 3, 0]]})
    adapter = session.adapter_for("testing:tiny-resnet")
    _, model = build_quant_model(adapter, "testing:tiny-resnet", recipe, torch.device("cpu"))
    layers = dict(quant_layers(model))
    assert layers["stem.conv"].weight_spec.bits == 8 and layers["stem.conv"].input_quantizer.spec.bits == 8
    assert layers["head.fc"].weight_spec.bits == 8 and layers["head.fc"].input_quantizer.spec.bits == 8
    assert layers["layer1.0.conv1"].weight_spec.bits == 2 and layers["layer1.0.conv1"].input_quantizer.spec.bits == 4
    assert layers["layer1.1.conv2"].weight_spec.bits == 3 and layers["layer1.1.conv2"].input_quantizer is None
    assert all(isinstance(m, QuantLayer) for m in layers.values())


def test_group_scheduler_validates_groups(session) -> None:  # type: ignore[no-untyped-def]
    blocks = tiny_resnet().quant_blocks()
    sched = session.make("scheduler", ComponentRef("groups", {"groups": [["layer1.0", "layer1.1"], "layer2.0"]}))
    plan = sched.plan(blocks)
    assert [u.blocks for u in plan] == [("stem",), ("layer1.0", "layer1.1"), ("layer2.0",), ("head",)]
    with pytest.raises(ConfigError, match="adjacent"):
        session.make("scheduler", ComponentRef("groups", {"groups": [["stem", "layer1.1"]]})).plan(blocks)
    with pytest.raises(ConfigError, match="unknown block"):
        session.make("scheduler", ComponentRef("groups", {"groups": ["nope"]})).plan(blocks)
    stage = session.make("scheduler", ComponentRef("stage")).plan(blocks)
    assert [u.blocks for u in stage] == [("stem",), ("layer1.0", "layer1.1"), ("layer2.0",), ("head",)]
    assert len(session.make("scheduler", ComponentRef("network")).plan(blocks)) == 1


def test_stage_and_network_units_reconstruct(session, fast) -> None:  # type: ignore[no-untyped-def]
    for name in ("stage", "network"):
        result = apply("soft-offset", session=session, eval_samples=100,
                       overrides={**fast, "weight.bits": 3, "activation": None, "recon.iters": 60,
                                  "scheduler.name": name})
        assert all(r.loss_after < r.loss_before for r in result.records)


def test_nan_calibration_data_is_a_clear_error(session) -> None:  # type: ignore[no-untyped-def]
    class NanData(DataSource):
        """NaN images."""

        name = "nan"
        prefixes = ("nan",)

        def load(self, spec, split, *, num_samples, seed):  # type: ignore[no-untyped-def]
            x = torch.randn(16, 3, 16, 16)
            x[3, 0, 0, 0] = float("nan")
            return torch.utils.data.TensorDataset(x, torch.zeros(16, dtype=torch.long))

    session.data_sources.register(NanData, "test")
    with pytest.raises(DataError, match="NaN"):
        apply("nearest", "testing:tiny-resnet", data="nan:x", session=session)


def test_weights_first_order_runs_two_passes(session, fast) -> None:  # type: ignore[no-untyped-def]
    """BRECQ's order: weights reconstructed with activations off, then steps learned with weights fixed."""
    result = apply("soft-offset", session=session, eval_samples=100,
                   overrides={**fast, "weight.bits": 3, "activation.bits": 4, "recon.order": "weights_first",
                              "recon.learn_act_step": True, "recon.act_iters": 40, "recon.iters": 100,
                              "recon.act_lr": 4e-4})
    passes = [r.pass_name for r in result.records]
    assert passes == ["weights"] * 5 + ["activations"] * 5
    acts = [r for r in result.records if r.pass_name == "activations"]
    assert all(r.iters == 40 for r in acts)
    assert sum(r.loss_after < r.loss_before for r in acts) >= 4
    weights = [r for r in result.records if r.pass_name == "weights"]
    assert all(r.loss_after < r.loss_before for r in weights)
    layers = dict(quant_layers(result.model))
    assert all(layer.input_quantizer.enabled for layer in layers.values())
    assert result.quant_metrics["top1"] > 50


def test_bn_statistics_are_kept_after_folding() -> None:
    model = tiny_resnet(0).eval()
    bn = model.stem.bn
    with torch.no_grad():
        bn.running_mean.fill_(0.25)
    fold_batchnorm(model)
    stats = model.quantplug_bn_stats
    assert set(stats) >= {"stem.conv", "layer1.0.conv1", "layer2.0.downsample.0"}
    assert torch.equal(stats["stem.conv"]["mean"], torch.full((8,), 0.25))


def test_rounder_final_qparams_replace_the_grid(session, fast) -> None:  # type: ignore[no-untyped-def]
    """A rounding that learns its own grid (FlexRound's s1) hands its scale over when hardening."""
    from quantplug import hookimpl as impl
    from quantplug.builtins.roundings import NearestRounder
    from quantplug.interfaces import Rounding

    class HalfGrid(NearestRounder):
        def final_qparams(self):  # type: ignore[no-untyped-def]
            q = self.layer[0].weight_quantizer
            return q.scale / 2, q.zero_point

    class HalfGridRounding(Rounding):
        """Test-only: reports half the quantizer's scale as its final grid."""

        name = "half-grid"

        def attach(self, layer, *, generator=None):  # type: ignore[no-untyped-def]
            return HalfGrid(layer)

    class P:
        @impl
        def register_roundings(self, register):  # type: ignore[no-untyped-def]
            register(HalfGridRounding)

    session.pm.register(P())
    session.roundings.register(HalfGridRounding, "test")
    ref = apply("nearest", session=session, overrides={**fast, "activation": None}, eval_samples=20)
    half = apply("nearest", session=session, eval_samples=20,
                 overrides={**fast, "activation": None, "rounding.name": "half-grid"})
    a, b = dict(quant_layers(ref.model)), dict(quant_layers(half.model))
    assert torch.allclose(b["layer1.0.conv1"].weight_quantizer.scale, a["layer1.0.conv1"].weight_quantizer.scale / 2)


def test_quantized_forward_switches_the_policy_off_and_restores_it() -> None:
    from quantplug.config import PerTensor, QuantSpec
    from quantplug.engine import quantized_forward
    from quantplug.quantizer import AffineQuantizer

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    act = AffineQuantizer(QuantSpec(2, False, PerTensor()))
    act.set_qparams(torch.tensor([0.5]), torch.tensor([2.0]))
    module = torch.nn.Sequential(act, layer)
    x = torch.randn(16, 8)
    plain = module(x)

    def keep_everything(t: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(t, dtype=torch.bool), None  # quantize nothing: full precision

    act.selector = keep_everything
    mixed = module(x)
    assert torch.allclose(mixed, layer(x)) and not torch.allclose(mixed, plain)
    again = quantized_forward(module, x, [act])
    assert torch.equal(again, plain)
    assert act.selector is keep_everything  # restored


def test_freed_memory_is_released_after_every_unit(session, fast, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import quantplug.engine as engine_module
    import quantplug.memory as memory

    calls: list[int] = []
    monkeypatch.setattr(memory, "_MALLOC_TRIM", lambda pad: calls.append(pad) or 1)
    seen: list[str] = []
    monkeypatch.setattr(engine_module, "release_freed_memory",
                        lambda device: (seen.append(device.type), memory.release_freed_memory(device)))
    result = apply("soft-offset", "testing:tiny-resnet", session=session, eval_samples=20, evaluate_fp=False,
                   overrides={**fast, "weight.bits": 3, "activation": None, "recon.iters": 3})
    assert len(result.records) > 1 and seen == ["cpu"] * len(result.records) and calls == [0] * len(result.records)
    if sys.platform.startswith("linux"):
        assert memory._find_malloc_trim() is not None  # glibc: the real trim is found


def test_nan_weights_name_the_layer(session) -> None:  # type: ignore[no-untyped-def]
    from quantplug.calibrate import calibrate_weights
    from quantplug.config import QuantSpec, Recipe
    from quantplug.prepare import prepare_model

    adapter = session.adapter_for("testing:tiny-resnet")
    model = adapter.load("testing:tiny-resnet", device=torch.device("cpu"))
    recipe = Recipe(weight=QuantSpec(4, False))
    name = adapter.quantizable_layers(model)[2]
    prepare_model(model, adapter, recipe)
    with torch.no_grad():
        model.get_submodule(name).weight[0].view(-1)[0] = float("nan")
    with pytest.raises(DataError, match=f"layer '{name}' has NaN or inf weights"):
        calibrate_weights(model, session, recipe)


def test_a_non_finite_loss_at_any_step_stops_the_run(session, fast, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One NaN step is enough to poison Adam's state and every rounding parameter (hardening then rounds them all
    down); the loss used to be looked at every 50th step only, so 40-step units never noticed."""
    rounder_module = sys.modules[session.registry("rounding").get("soft-offset").__module__]  # the conftest
    SoftOffsetRounder = rounder_module.SoftOffsetRounder  # noqa: N806
    regularization = SoftOffsetRounder.regularization

    def nan_once(self, progress):  # type: ignore[no-untyped-def]
        if progress == 10 / 40:  # iteration 10 of 40
            return torch.tensor(float("nan"))
        return regularization(self, progress)

    monkeypatch.setattr(SoftOffsetRounder, "regularization", nan_once)
    with pytest.raises(FloatingPointError, match=r"became NaN or infinite by iteration 40 of 40.*learning rates"):
        apply("soft-offset", "testing:tiny-resnet", session=session, eval_samples=32,
              overrides={**fast, "weight.bits": 3, "activation": None, "recon.iters": 40})
