"""End to end through quantplug.api.apply on tiny models: layer- and block-wise units, activation quantization."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from quantplug.api import apply
from quantplug.modules import quant_layers
from quantplug.plugins import Session

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

torch.set_num_threads(1)
SMALL = {"calib.num_samples": 16, "calib.batch_size": 8, "recon.batch_size": 4,
         "bits.first_layer_bits": None, "bits.last_layer_bits": None}


def _apply(recipe: str, family: str, overrides: dict, tmp_path: Path | None = None):  # type: ignore[no-untyped-def]
    return apply(recipe, tiny_models.model_id(family), data=tiny_models.data_spec(family), overrides=overrides,
                 eval_samples=8, session=Session(entry_points=True),
                 out_dir=str(tmp_path / "run") if tmp_path else None)


def test_layer_units_on_opt_whose_mlp_sees_flattened_tokens() -> None:
    """OPT runs fc1 / fc2 on (batch x tokens) rows; layer-wise units cache them per sample."""
    pytest.importorskip("quantplug_adaround")
    result = _apply("adaround", "opt", {**SMALL, "weight.bits": 3, "activation": None, "recon.iters": 5,
                                        "calib.num_samples": 8})
    assert len(result.records) == 12 and "model.decoder.layers.0.fc1" in result.plan
    assert result.quant_metrics["perplexity"] > 0


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_block_units_with_quantized_activations(family: str, tmp_path: Path) -> None:
    """W4A8 block reconstruction (QDrop: learned activation steps, input mixing) runs on decoder and encoder."""
    pytest.importorskip("quantplug_qdrop")
    result = _apply("qdrop", family, {**SMALL, "weight.bits": 4, "activation.bits": 8, "recon.iters": 20,
                                      "weight.granularity": "per_tensor"}, tmp_path)
    assert [r.name for r in result.records] == [b for b in result.plan]
    # random tiny weights leave almost nothing to learn: the error must not grow (real models: test_zoo.py)
    assert all(r.loss_after <= 1.1 * r.loss_before for r in result.records)
    layers = dict(quant_layers(result.model))  # type: ignore[arg-type]
    assert layers and all(q.input_quantizer is not None for q in layers.values())
    assert (tmp_path / "run" / "quantplug.json").is_file()
    key = "perplexity" if family != "bert" else "embedding_cosine"
    assert key in result.quant_metrics


def test_per_group_weights_and_quantized_head(tmp_path: Path) -> None:
    result = apply("nearest", tiny_models.model_id("opt"), data=tiny_models.data_spec("opt"),
                   overrides={**SMALL, "weight.bits": 4, "activation": None,
                              "weight.granularity": {"kind": "per_group", "group_size": 16}},
                   eval_samples=8, session=Session(entry_points=True))
    layers = dict(quant_layers(result.model))  # type: ignore[arg-type]
    assert "lm_head" not in layers and len(layers) == 12
    assert result.quant_metrics["perplexity"] == pytest.approx(result.fp_metrics["perplexity"], rel=0.2)
