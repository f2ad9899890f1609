"""The transformers adapter: conformance on tiny OPT / GPT-Neo / BERT / LLaMA models, structure, units."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from quantplug_transformers.adapter import TransformersAdapter
from quantplug_transformers.units import LayerUnit

from quantplug.errors import ModelLoadError
from quantplug.testing.conformance import AdapterConformance

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

torch.set_num_threads(1)


class TestOPTConformance(AdapterConformance):
    component = TransformersAdapter
    model_id = tiny_models.model_id("opt")
    data = tiny_models.data_spec("opt")


class TestGPTNeoConformance(AdapterConformance):
    component = TransformersAdapter
    model_id = tiny_models.model_id("gptneo")
    data = tiny_models.data_spec("gptneo")


class TestLlamaConformance(AdapterConformance):
    component = TransformersAdapter
    model_id = tiny_models.model_id("llama")
    data = tiny_models.data_spec("llama")


class TestBertConformance(AdapterConformance):
    component = TransformersAdapter
    model_id = tiny_models.model_id("bert")
    data = tiny_models.data_spec("bert")


class TestBertClassifierConformance(AdapterConformance):
    component = TransformersAdapter
    model_id = tiny_models.model_id("bert-seqcls")
    data = tiny_models.data_spec("bert-seqcls")


def _load(family: str) -> tuple[TransformersAdapter, torch.nn.Module]:
    adapter = TransformersAdapter()
    return adapter, adapter.load(tiny_models.model_id(family), device=torch.device("cpu"))


@pytest.mark.parametrize("family", ["opt", "gptneo", "llama", "bert"])
def test_layer_unit_matches_model_at_any_length_and_batch(family: str) -> None:
    """The captured masks / positions reproduce the model's own layer outputs (causal masking included)."""
    adapter, model = _load(family)
    blocks = adapter.blocks(model)
    for length, batch in ((16, 3), (40, 2)):
        ids = torch.randint(5, tiny_models.VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
            hidden = adapter.block_module(model, blocks[0])(ids)
            assert torch.allclose(hidden, states[0], atol=1e-6)
            unit = adapter.block_module(model, blocks[1])
            assert isinstance(unit, LayerUnit)
            assert torch.allclose(unit(hidden), states[1], atol=1e-5)


def test_causal_units_do_not_see_the_future() -> None:
    """Changing the last token leaves the earlier positions of a decoder layer's output unchanged."""
    adapter, model = _load("gptneo")
    unit = adapter.block_module(model, adapter.blocks(model)[1])
    x = torch.randn(1, 12, 32)
    y = x.clone()
    y[:, -1] += 1.0
    with torch.no_grad():
        a, b = unit(x), unit(y)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6)
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_blocks_embeddings_and_head_full_precision_by_default() -> None:
    adapter, model = _load("opt")
    names = adapter.quantizable_layers(model)
    assert "lm_head" not in names and all(".layers." in n for n in names)
    assert len(names) == 2 * 6  # q, k, v, out, fc1, fc2 per layer
    head = TransformersAdapter(TransformersAdapter.Config(quantize_head=True))
    assert head.quantizable_layers(model)[-1] == "lm_head"
    kinds = [b.kind for b in adapter.blocks(model)]
    assert kinds[0] == "embedding" and kinds[-1] == "head"


def test_perplexity_is_exp_of_mean_next_token_nll() -> None:
    adapter, _ = _load("opt")
    logits = torch.zeros(2, 5, 7)  # uniform predictions: perplexity = vocabulary size
    ids = torch.randint(0, 7, (2, 5))
    final = adapter.finalize_metrics(adapter.metrics(logits, ids))
    assert final["perplexity"] == pytest.approx(7.0, rel=1e-5)
    logits[0, torch.arange(4), ids[0, 1:]] = 50.0  # first sample predicted perfectly
    assert adapter.finalize_metrics(adapter.metrics(logits, ids))["perplexity"] == pytest.approx(7 ** 0.5, rel=1e-4)


def test_embedding_cosine_and_agreement_metrics() -> None:
    adapter, _ = _load("bert")
    states = torch.randn(4, 6, 8)
    ref = states.mean(1)
    assert adapter.finalize_metrics(adapter.metrics(states, ref))["embedding_cosine"] == pytest.approx(1.0)
    assert adapter.finalize_metrics(adapter.metrics(states, -ref))["embedding_cosine"] == pytest.approx(-1.0)
    assert float(adapter.task_loss(states, ref)) == pytest.approx(0.0, abs=1e-6)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    ref_logits = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    assert adapter.finalize_metrics(adapter.metrics(logits, ref_logits))["agreement"] == pytest.approx(50.0)
    labels = torch.tensor([0, 0])
    assert adapter.finalize_metrics(adapter.metrics(logits, labels))["accuracy"] == pytest.approx(50.0)


def test_unsupported_family_is_named() -> None:
    from quantplug_transformers.structure import layout_of

    with pytest.raises(ModelLoadError, match="BERT, OPT, GPT-Neo"):
        layout_of(torch.nn.Linear(2, 2))
