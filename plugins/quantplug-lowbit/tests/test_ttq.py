"""TTQ: threshold, initial scales, the paper's gradients, the pass end to end, save / load and int export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import quantplug_lowbit
import torch
from quantplug_lowbit import TTQPass, TTQWeights, ttq_indices
from torch import nn

from quantplug.api import apply
from quantplug.builtins import exporters
from quantplug.builtins.exporters import IntExporter, load_packed
from quantplug.config import PerTensor, QuantSpec
from quantplug.errors import ConfigError
from quantplug.export import load
from quantplug.modules import QuantConv2d, quant_layers
from quantplug.plugins import Session
from quantplug.testing.conformance import ModelPassConformance, RecipeSmoke
from quantplug.testing.data import synthetic_images

torch.set_num_threads(1)
FAST = {"calib.num_samples": 64, "calib.batch_size": 32}


def _layer() -> QuantConv2d:
    torch.manual_seed(0)
    return QuantConv2d(nn.Conv2d(4, 6, 3), QuantSpec(2, True, PerTensor()), None)


def _weights(**options: Any) -> TTQWeights:
    return TTQWeights(_layer(), TTQPass.make_config(options))


def test_assignment_uses_five_percent_of_the_max() -> None:
    w = torch.tensor([1.0, -0.06, 0.05, -0.04, 0.2, -2.0])  # max |W| = 2, Delta = 0.1
    assert ttq_indices(w, 0.05).tolist() == [2, 1, 1, 1, 2, 0]
    weights = _weights()
    v = weights.latent.detach()
    delta = 0.05 * v.abs().max()
    expected = torch.where(v > delta, 2, torch.where(v < -delta, 0, 1))
    assert torch.equal(weights.indices(), expected)


def test_initial_scales() -> None:
    weights = _weights()
    w = weights.layer[0].weight.detach()
    delta = 0.05 * w.abs().max()
    table = weights.table().detach()
    assert float(table[1]) == 0.0
    assert float(table[2]) == pytest.approx(float(w[w > delta].mean()), rel=1e-5)  # mean of the kept positives
    assert float(-table[0]) == pytest.approx(float(-w[w < -delta].mean()), rel=1e-5)
    official = _weights(init="max").table().detach()  # the code's initial 1.0 on the paper's normalized weights
    assert torch.allclose(official, torch.stack([-w.abs().max(), torch.tensor(0.0), w.abs().max()]))


def test_forward_is_the_lookup_and_gradients_follow_the_paper() -> None:
    weights = _weights()
    index = weights.indices()
    out = weights()
    assert torch.equal(out.detach(), weights.table().detach()[index])
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * upstream).sum().backward()
    unit = weights.unit
    pos, neg = index == 2, index == 0
    # eq. 2: dL/dW_p = sum over I_p, dL/dW_n = -sum over I_n (w_t = -W_n); W_p, W_n are stored in units of max|W|
    assert float(weights.positive.grad) == pytest.approx(float(unit * upstream[pos].sum()), rel=1e-5)
    assert float(weights.negative.grad) == pytest.approx(float(-unit * upstream[neg].sum()), rel=1e-5)
    # eq. 3: the latent (normalized) weights get W_p, 1 or W_n times dL/dw_t
    coef = torch.where(pos, weights.positive.detach(), torch.where(neg, weights.negative.detach(), torch.tensor(1.0)))
    assert torch.allclose(weights.latent.grad, unit * coef * upstream)


def test_scales_only_leaves_the_assignment_fixed() -> None:
    weights = _weights(learn_assignments=False)
    assert not weights.latent.requires_grad
    weights().sum().backward()
    assert weights.latent.grad is None and weights.positive.grad is not None


def test_bad_options() -> None:
    for options, match in (({"init": "zero"}, "init"), ({"threshold": 1.5}, "threshold"), ({"epochs": -1}, "epochs")):
        with pytest.raises(ConfigError, match=match):
            TTQPass.make_config(options)


def _session() -> Session:
    return Session(entry_points=False, plugins=[quantplug_lowbit, exporters])


@pytest.fixture(scope="module")
def ttq_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Session]:
    session = _session()
    out = tmp_path_factory.mktemp("ttq") / "run"
    result = apply("ttq", "testing:tiny-resnet", session=session, out_dir=str(out), eval_samples=200,
                   overrides={**FAST, "passes": [{"name": "ttq", "options": {"epochs": 3}}]})
    return out, result, session


def test_pass_ternarizes_inner_layers_and_lowers_the_task_loss(ttq_run: tuple[Path, Any, Session]) -> None:
    _, result, _ = ttq_run
    summary = result.passes["ttq"]
    assert summary["loss_after"] < summary["loss_before"]
    layers = dict(quant_layers(result.model))
    first, last = "stem.conv", "head.fc"
    assert layers[first].weight_spec is None and layers[last].weight_spec is None  # full precision, as in the code
    ternary = {n: m for n, m in layers.items() if m.weight_spec is not None}
    assert ternary and all(m.has_codebook for m in ternary.values())
    for name, layer in ternary.items():
        table = layer.weight_codebook
        assert table.numel() == 3 and float(table[1]) == 0.0 and table[0] < 0 < table[2]
        assert set(layer.weight_indices.unique().tolist()) <= {0, 1, 2}
        assert summary["layers"][name]["w_p"] == pytest.approx(float(table[2]))
        assert set(layer.quantized_weight().unique().tolist()) <= set(table.tolist())


def test_save_load_gives_identical_outputs(ttq_run: tuple[Path, Any, Session]) -> None:
    out, result, session = ttq_run
    x = synthetic_images(16, "test", 5).tensors[0]
    reloaded = load(str(out), session=session)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))
    manifest = json.loads((out / "quantplug.json").read_text())
    assert "ttq" in manifest["passes"] and manifest["recipe"]["passes"][0]["name"] == "ttq"


def test_int_export_packs_two_bit_indices(ttq_run: tuple[Path, Any, Session], tmp_path: Path) -> None:
    out, result, session = ttq_run
    IntExporter().export(result.model, out, tmp_path / "int", session=session)
    packing = json.loads((tmp_path / "int" / "quantplug.json").read_text())["packing"]
    assert {v["bits"] for v in packing["layers"].values()} == {2}
    reloaded = load_packed(tmp_path / "int", session=session)
    x = synthetic_images(16, "test", 6).tensors[0]
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


def test_no_quantized_layer_is_a_clear_error() -> None:
    overrides = {**FAST, "weight.bits": 4, "bits.overrides": [["*", 0, 0]]}
    with pytest.raises(ConfigError, match="no layer with quantized weights"):
        apply("ttq", "testing:tiny-resnet", session=_session(), eval_samples=32, overrides=overrides)


class TestTTQPassConformance(ModelPassConformance):
    component = TTQPass
    options = {"epochs": 1}


class TestTTQRecipe(RecipeSmoke):
    recipe = "ttq"
    overrides = {"calib.num_samples": 1024, "calib.batch_size": 64}  # the recipe's data: 128 steps of fine-tuning
