"""The kmeans pass: pooled centroid gradients, codebooks per layer, fine-tuning, save / load, int export, recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import quantplug_kmeans
import torch
from quantplug_kmeans import KMeansPass, SharedWeights, centroid_unit, cluster_layer
from quantplug_kmeans.clustering import assign, cluster_means
from torch import nn

from quantplug.api import apply
from quantplug.builtins import exporters
from quantplug.builtins.exporters import IntExporter, load_packed
from quantplug.config import PerTensor, QuantSpec
from quantplug.errors import ConfigError
from quantplug.export import load
from quantplug.modules import QuantConv2d, quant_layers
from quantplug.plugins import Session
from quantplug.recipes import resolve_recipe
from quantplug.testing.conformance import ModelPassConformance, RecipeSmoke
from quantplug.testing.data import synthetic_images

FAST = {"calib.num_samples": 128, "calib.batch_size": 64}


def _conv(bits: int = 3) -> QuantConv2d:
    torch.manual_seed(0)
    return QuantConv2d(nn.Conv2d(4, 6, 3), QuantSpec(bits, False, PerTensor()), None)


def test_centroid_gradient_is_the_sum_of_its_members_gradients() -> None:
    layer = _conv()
    shared, info = cluster_layer(layer, init="linear", max_iter=100, generator=None)
    assert info["bits"] == 3 and info["converged"]
    x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    centroids = shared.centroids()
    centroids.retain_grad()
    weight = centroids[shared.indices]
    weight.retain_grad()
    loss = nn.functional.conv2d(x, weight).square().mean()
    loss.backward()
    pooled = torch.zeros(8).index_add_(0, shared.indices.reshape(-1), weight.grad.reshape(-1))  # Han et al. eq. 3
    assert torch.allclose(centroids.grad, pooled, rtol=1e-5, atol=1e-8)
    # the learned parameter is the centroid in units of max |W|: its gradient is the pooled one times that unit
    assert torch.allclose(shared.normalized.grad, pooled * shared.unit, rtol=1e-5, atol=1e-8)


def test_shared_weights_forward_is_the_lookup_and_hardens_to_uint8() -> None:
    layer = _conv(4)
    shared, _ = cluster_layer(layer, init="linear", max_iter=100, generator=None)
    assert torch.equal(shared().detach(), shared.centroids().detach()[shared.indices])
    table, indices = shared.codebook()
    assert table.numel() == 16 and indices.dtype == torch.uint8
    layer.weight_quantizer.set_qparams(torch.ones(1), torch.zeros(1))  # a calibrated layer, as after a run
    layer.set_codebook(table, indices)
    assert torch.equal(layer.quantized_weight(), shared().detach())
    with pytest.raises(ConfigError, match="do not match"):
        SharedWeights(layer, table, indices[:1])


def test_centroid_unit_closed_forms() -> None:
    w = torch.tensor([[-0.5, 0.1], [2.0, 0.3]])
    assert float(centroid_unit(w, 4, "max")) == pytest.approx(2.0)  # max |W|
    assert float(centroid_unit(w, 4, "spacing")) == pytest.approx(2.5 / 3)  # (max W - min W) / (k - 1)
    assert float(centroid_unit(-w, 16, "spacing")) == pytest.approx(2.5 / 15)
    assert float(centroid_unit(torch.zeros(3), 4, "spacing")) > 0  # a constant layer still has a positive unit
    with pytest.raises(ConfigError, match="lr_unit must be one of spacing, max; got 'range'"):
        centroid_unit(w, 4, "range")


@pytest.mark.parametrize("lr_unit", ["max", "spacing"])
def test_first_adam_step_moves_each_centroid_by_lr_times_the_unit(lr_unit: str) -> None:
    lr, relative_moves = 1e-3, {}
    for bits in (2, 4):
        layer = _conv(bits)
        shared, info = cluster_layer(layer, init="linear", max_iter=100, generator=None, lr_unit=lr_unit)
        w = layer.weight.detach()
        closed_form = w.abs().max() if lr_unit == "max" else (w.max() - w.min()) / (2**bits - 1)
        assert info["centroid_unit"] == pytest.approx(float(closed_form), rel=1e-6)
        before = shared.centroids().detach().clone()
        optimizer = torch.optim.Adam([shared.normalized], lr=lr)
        x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        nn.functional.conv2d(x, shared()).square().mean().backward()
        has_grad = shared.normalized.grad.abs() > 0
        optimizer.step()
        moved = (shared.centroids().detach() - before).abs()[has_grad]
        assert torch.allclose(moved, torch.full_like(moved, lr) * closed_form, rtol=1e-3)  # Adam: |step| = lr
        spacing = float((w.max() - w.min()) / (2**bits - 1))  # distance between neighbouring linear-init centroids
        relative_moves[bits] = float(moved.mean()) / spacing
    if lr_unit == "spacing":  # the same fraction of the centroid spacing whatever the codebook size
        assert relative_moves[2] == pytest.approx(relative_moves[4], rel=1e-3)
    else:  # in max |W| units a step is (k - 1) / range * max|W| spacings: larger for bigger codebooks
        assert relative_moves[4] > 3 * relative_moves[2]


def test_bad_options() -> None:
    for options, match in (({"init": "kmeans++"}, "init"), ({"epochs": -1}, "epochs"), ({"max_iter": 0}, "max_iter"),
                           ({"lr_unit": "range"}, "kmeans lr_unit must be one of spacing, max")):
        with pytest.raises(ConfigError, match=match):
            KMeansPass.make_config(options)


def _session() -> Session:
    return Session(entry_points=False, plugins=[quantplug_kmeans, exporters])


def _run(out: Path, epochs: int, **overrides: Any) -> Any:
    return apply("kmeans", "testing:tiny-resnet", session=_session(), out_dir=str(out), eval_samples=64,
                 evaluate_fp=False,
                 overrides={**FAST, "passes": [{"name": "kmeans", "options": {"epochs": epochs}}], **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("kmeans")
    return {epochs: (root / f"e{epochs}", _run(root / f"e{epochs}", epochs)) for epochs in (0, 4)}


def test_every_layer_gets_a_codebook_of_two_to_the_bits(runs: dict[int, tuple[Path, Any]]) -> None:
    _, result = runs[4]
    layers = dict(quant_layers(result.model))
    assert layers and all(m.has_codebook for m in layers.values())  # first and last layer too, as in the paper
    for name, layer in layers.items():
        assert layer.weight_codebook.numel() == 2 ** result.recipe.weight.bits == 16
        assert layer.weight_indices.dtype == torch.uint8 and int(layer.weight_indices.max()) < 16
        assert result.passes["kmeans"]["layers"][name]["converged"]


def test_without_fine_tuning_the_centroids_are_the_cluster_means(runs: dict[int, tuple[Path, Any]]) -> None:
    _, result = runs[0]
    for _, layer in quant_layers(result.model):
        w, idx, table = layer.weight.detach().double(), layer.weight_indices.long(), layer.weight_codebook
        for j in idx.unique().tolist():
            assert float(table[j]) == pytest.approx(float(w[idx == j].mean()), abs=1e-6)


def test_fine_tuning_moves_only_the_centroids_and_lowers_the_task_loss(runs: dict[int, tuple[Path, Any]]) -> None:
    _, plain = runs[0]
    _, tuned = runs[4]
    summary = tuned.passes["kmeans"]
    assert summary["steps"] == 4 * 2 and summary["loss_after"] < summary["loss_before"]
    assert summary["loss_before"] == pytest.approx(plain.passes["kmeans"]["loss_after"])
    a, b = dict(quant_layers(plain.model)), dict(quant_layers(tuned.model))
    moved = False
    for name in a:
        assert torch.equal(a[name].weight_indices, b[name].weight_indices)  # indices stay fixed (the paper)
        assert torch.equal(a[name].bias, b[name].bias) and torch.equal(a[name].weight, b[name].weight)
        moved |= not torch.equal(a[name].weight_codebook, b[name].weight_codebook)
    assert moved


def test_the_pass_learns_centroids_in_the_configured_unit(runs: dict[int, tuple[Path, Any]], tmp_path: Path) -> None:
    _, default = runs[4]
    spacing = _run(tmp_path / "spacing", 4, **{"passes": [{"name": "kmeans", "options": {"epochs": 4,
                                                                                        "lr_unit": "spacing"}}]})
    k = 2 ** spacing.recipe.weight.bits
    for name, layer in quant_layers(spacing.model):
        w = layer.weight.detach()
        assert default.passes["kmeans"]["layers"][name]["centroid_unit"] == pytest.approx(float(w.abs().max()))
        assert spacing.passes["kmeans"]["layers"][name]["centroid_unit"] == pytest.approx(float(w.max() - w.min())
                                                                                           / (k - 1))
    # Adam moves a centroid by about lr per step in its unit: over the run's steps each layer's largest centroid
    # move is between one step and all steps of lr * unit, whichever the unit (so ~7x less with "spacing" here)
    _, plain = runs[0]
    lr, steps = KMeansPass.Config().lr, spacing.passes["kmeans"]["steps"]
    assert steps == default.passes["kmeans"]["steps"] == 8
    for name, start in quant_layers(plain.model):
        for run in (default, spacing):
            tuned = dict(quant_layers(run.model))[name].weight_codebook
            unit = run.passes["kmeans"]["layers"][name]["centroid_unit"]
            largest_move = float((tuned - start.weight_codebook).abs().max()) / (lr * unit)
            assert 1.0 <= largest_move <= 1.1 * steps, (name, largest_move)


def test_save_load_and_int_export_reproduce_the_outputs(runs: dict[int, tuple[Path, Any]], tmp_path: Path) -> None:
    out, result = runs[4]
    x = synthetic_images(16, "test", 9).tensors[0]
    with torch.no_grad():
        expected = result.model(x)
        assert torch.equal(load(str(out), session=_session())(x), expected)
    info = IntExporter().export(result.model, out, tmp_path / "int", session=_session())
    packing = json.loads((tmp_path / "int" / "quantplug.json").read_text())["packing"]
    assert all(v["kind"] == "codebook" and v["bits"] == 4 for v in packing["layers"].values())
    weights = sum(m.weight.numel() for _, m in quant_layers(result.model))
    assert info["packed_weight_bytes"] <= weights // 2 + len(packing["layers"])  # 4 bits per weight
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "int", session=_session())(x), expected)


def test_official_preset_is_eight_bit_conv_five_bit_fc() -> None:
    r = resolve_recipe(_session(), "kmeans", preset="official")
    assert r.weight.bits == 8 and r.bits.last_layer_bits == 5 and r.bits.first_layer_bits is None
    base = resolve_recipe(_session(), "kmeans")
    assert base.activation is None and [p.name for p in base.passes] == ["kmeans"]


def test_the_pass_starts_from_the_papers_linear_initialization() -> None:
    """Han et al. sec. 3.2: centroids start at linspace(min W, max W, 2^b) ("linear initialization works best"),
    the default of the pass and of every preset. With one Lloyd update and no fine-tuning the codebooks must be
    exactly one update away from that start (a density or random start gives other codebooks)."""
    assert KMeansPass.Config().init == "linear"
    for preset in (None, "official", "no-finetune"):
        ref = resolve_recipe(_session(), "kmeans", preset=preset).passes[0]
        assert KMeansPass.make_config(ref.options).init == "linear"
    result = apply("kmeans", "testing:tiny-resnet", session=_session(), eval_samples=32, evaluate_fp=False,
                   overrides={"calib.num_samples": 32, "calib.batch_size": 32,
                              "passes": [{"name": "kmeans", "options": {"max_iter": 1, "epochs": 0}}]})
    layers = dict(quant_layers(result.model))
    assert layers
    for name, layer in layers.items():
        w = layer.weight.detach().reshape(-1)
        start = torch.linspace(float(w.min()), float(w.max()), 2**layer.weight_spec.bits)
        first = assign(w, start)
        updated = cluster_means(w, first, start)  # kmeans_1d's one update (max_iter=1) ...
        second = assign(w, updated)
        converged = torch.equal(second, first)  # ... and, if assignments still change, the final cluster means
        expected = updated if converged else cluster_means(w, second, updated)
        assert torch.allclose(layer.weight_codebook, expected, rtol=1e-5, atol=1e-7), name
        assert torch.equal(layer.weight_indices.long().reshape(-1), first if converged else second), name


def test_no_quantized_layer_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no layer with quantized weights"):
        apply("kmeans", "testing:tiny-resnet", session=_session(), eval_samples=32,
              overrides={**FAST, "bits.overrides": [["*", 0, 0]]})


class TestKMeansPassConformance(ModelPassConformance):
    component = KMeansPass
    options = {"epochs": 1}


class TestKMeansRecipe(RecipeSmoke):
    recipe = "kmeans"
    overrides = {"calib.num_samples": 256, "calib.batch_size": 64}
