"""The kmeans pass: pooled centroid gradients, codebooks per layer, fine-tuning, save / load, int export, recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import quantplug_kmeans
import torch
from quantplug_kmeans import KMeansPass, SharedWeights, cluster_layer
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


def test_bad_options() -> None:
    for options, match in (({"init": "kmeans++"}, "init"), ({"epochs": -1}, "epochs"), ({"max_iter": 0}, "max_iter")):
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
