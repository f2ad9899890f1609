"""Lookup-table weights (``QuantLayer.set_codebook``): forward, validation, save / load, the ``int`` exporter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from quantplug.api import apply
from quantplug.builtins import exporters
from quantplug.builtins.exporters import IntExporter, codebook_index_bits, load_packed
from quantplug.config import PerChannel, QuantSpec
from quantplug.errors import ConfigError, QuantplugError
from quantplug.export import load
from quantplug.hookspecs import hookimpl
from quantplug.interfaces import ModelPass, PassContext
from quantplug.modules import QuantLinear, quant_layers
from quantplug.plugins import Session
from quantplug.testing.data import synthetic_images


def _layer() -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear(nn.Linear(6, 4), QuantSpec(4, False, PerChannel(0)), None)


def test_forward_uses_codebook_lookup_and_replaces_affine_codes() -> None:
    layer = _layer()
    layer.weight_quantizer.set_qparams(torch.full((4,), 0.1), torch.zeros(4))
    layer.set_codes(layer.nearest_codes())
    codebook = torch.tensor([-0.5, 0.0, 0.25])
    indices = torch.randint(0, 3, (4, 6), generator=torch.Generator().manual_seed(1))
    layer.set_codebook(codebook, indices)
    assert layer.has_codebook and layer.weight_codes is None
    assert layer.weight_indices.dtype == torch.uint8 and layer.weight_codebook.dtype == torch.float32
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), nn.functional.linear(x, codebook[indices], layer.bias))
    with pytest.raises(QuantplugError, match="codebook"):
        layer.nearest_codes()
    layer.set_codes(torch.zeros(4, 6))  # hardening to affine codes again drops the table
    assert not layer.has_codebook and layer.weight_codebook is None


@pytest.mark.parametrize(
    "codebook,indices,match",
    [
        (torch.zeros(257), torch.zeros(4, 6, dtype=torch.long), "1 to 256"),
        (torch.tensor([0.0, float("nan")]), torch.zeros(4, 6, dtype=torch.long), "NaN"),
        (torch.zeros(3), torch.zeros(4, 5, dtype=torch.long), "shape"),
        (torch.zeros(3), torch.zeros(4, 6), "integers"),
        (torch.zeros(3), torch.full((4, 6), 3), r"\[0, 2\]"),
        (torch.zeros(3, dtype=torch.long), torch.zeros(4, 6, dtype=torch.long), "floats"),
    ],
)
def test_bad_codebooks_are_rejected(codebook: torch.Tensor, indices: torch.Tensor, match: str) -> None:
    layer = _layer()
    with pytest.raises(ConfigError, match=match):
        layer.set_codebook(codebook, indices)
    assert not layer.has_codebook


def test_state_dict_round_trip_into_a_fresh_layer() -> None:
    layer = _layer()
    layer.weight_quantizer.set_qparams(torch.full((4,), 0.1), torch.zeros(4))
    layer.set_codebook(torch.linspace(-1, 1, 5), torch.randint(0, 5, (4, 6)))
    fresh = _layer()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6)
    assert fresh.has_codebook and torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("entries,bits", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (16, 4), (17, 5), (256, 8)])
def test_index_bits(entries: int, bits: int) -> None:
    assert codebook_index_bits(entries) == bits


class RandomCodebooks(ModelPass):
    """Test-only pass: every quantized layer gets a seeded random codebook of 2^bits entries."""

    name = "random-codebooks"
    stage = "quantized"

    def run(self, model: nn.Module, ctx: PassContext) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(ctx.seed)
        for _, layer in quant_layers(model):
            if layer.quantizes_weight and layer.weight_spec is not None:
                k = 3 if layer.weight_spec.bits == 2 else 2**layer.weight_spec.bits  # 3: an uneven table
                scale = float(layer.weight.abs().mean())
                codebook = torch.randn(k, generator=gen) * scale
                layer.set_codebook(codebook, torch.randint(0, k, layer.weight.shape, generator=gen))
        return {"layers": sum(1 for _, m in quant_layers(model) if m.has_codebook)}


class CodebookPlugin:
    @hookimpl
    def register_model_passes(self, register):  # type: ignore[no-untyped-def]
        register(RandomCodebooks)


@pytest.fixture(scope="module")
def codebook_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, Session]:
    session = Session(entry_points=False, plugins=[exporters, CodebookPlugin()])
    out = tmp_path_factory.mktemp("cb") / "run"
    result = apply("nearest", "testing:tiny-resnet", session=session, out_dir=str(out), eval_samples=32,
                   evaluate_fp=False, overrides={"weight.bits": 2, "calib.num_samples": 32, "calib.batch_size": 32,
                                                 "passes": [{"name": "random-codebooks"}]})
    assert result.passes["random-codebooks"]["layers"] > 0
    assert result.model is not None
    return out, result.model, session


def test_run_with_codebooks_reloads_identically(codebook_run: tuple[Path, nn.Module, Session]) -> None:
    out, model, session = codebook_run
    x = synthetic_images(16, "test", 3).tensors[0]
    reloaded = load(str(out), session=session)
    assert sum(m.has_codebook for _, m in quant_layers(reloaded)) > 0
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_int_export_packs_indices_and_reloads_identically(codebook_run: tuple[Path, nn.Module, Session],
                                                         tmp_path: Path) -> None:
    out, model, session = codebook_run
    info = IntExporter().export(model, out, tmp_path / "int", session=session)
    manifest = json.loads((tmp_path / "int" / "quantplug.json").read_text())
    packing = manifest["packing"]
    assert packing["version"] == 2
    entries = {n: v for n, v in packing["layers"].items() if v.get("kind") == "codebook"}
    assert entries and info["packed_layers"] == len(packing["layers"])
    for name, entry in entries.items():
        layer = model.get_submodule(name)
        assert entry["bits"] == codebook_index_bits(layer.weight_codebook.numel())
        assert entry["nbytes"] == (layer.weight.numel() * entry["bits"] + 7) // 8
    reloaded = load_packed(tmp_path / "int", session=session)
    x = synthetic_images(16, "test", 4).tensors[0]
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    for name in entries:
        a, b = reloaded.get_submodule(name), model.get_submodule(name)
        assert torch.equal(a.weight_indices, b.weight_indices) and torch.equal(a.weight_codebook, b.weight_codebook)
