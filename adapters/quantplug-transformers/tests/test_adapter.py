"""The transformers adapter: conformance on tiny OPT / GPT-Neo / BERT / LLaMA models, structure, units."""

from __future__ import annotations

import re
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


def test_token_targets_are_next_tokens_for_a_decoder_and_labels_for_an_encoder() -> None:
    """Integer [N, L] targets: perplexity for a causal LM; per-token accuracy (not a perplexity) for an encoder
    such as a masked LM or a token classifier. Labels -100 count in neither."""
    import transformers as tf

    opt, opt_model = _load("opt")
    ids = torch.randint(5, tiny_models.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = opt.forward(opt_model, ids)
    labels = ids.clone()
    labels[0, 3:] = -100
    sums = opt.metrics(logits, labels)
    assert sums["count"] == 2 * 5 - 3  # positions 1..5 of each window are predicted, three of them ignored
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    assert opt.finalize_metrics(sums)["perplexity"] == pytest.approx(float(torch.exp(nll / 7)), rel=1e-5)

    torch.manual_seed(0)
    mlm = tf.BertForMaskedLM(tf.BertConfig(vocab_size=tiny_models.VOCAB, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64,
                                           max_position_embeddings=64)).eval()
    adapter = TransformersAdapter()
    with torch.no_grad():
        out = adapter.forward(mlm, ids)
    targets = out.argmax(-1)
    targets[1, :] = -100  # unmasked positions of a masked-LM batch: not scored
    targets[0, 0] = (targets[0, 0] + 1) % tiny_models.VOCAB  # one wrong prediction out of six scored
    final = adapter.finalize_metrics(adapter.metrics(out, targets))
    assert set(final) == {"token_accuracy"} and final["token_accuracy"] == pytest.approx(500 / 6)
    expected = torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())  # unshifted, -100 skipped
    assert float(adapter.task_loss(out, targets)) == pytest.approx(float(expected), rel=1e-6)


def test_question_answering_agreement_is_per_start_and_end() -> None:
    import transformers as tf

    torch.manual_seed(0)
    qa = tf.BertForQuestionAnswering(tf.BertConfig(vocab_size=tiny_models.VOCAB, hidden_size=32,
                                                   num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=64, max_position_embeddings=64)).eval()
    adapter = TransformersAdapter()
    ids = torch.randint(5, tiny_models.VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = adapter.forward(qa, ids)
    assert out.shape == (3, 2, 10)  # start and end logits over the tokens
    reference = out.clone()
    start = int(out[0, 0].argmax())
    reference[0, 0, (start + 1) % 10] = reference[0, 0].max() + 1.0  # sample 0: another start token
    final = adapter.finalize_metrics(adapter.metrics(out, reference))
    assert final["agreement"] == pytest.approx(100.0 * 5 / 6)  # 5 of the 6 start / end predictions agree


def test_no_first_or_last_layer_exception_inside_the_transformer() -> None:
    from quantplug.config import QuantSpec, Recipe
    from quantplug.prepare import resolve_layer_bits

    adapter, model = _load("opt")
    assert adapter.first_last_layers(model) == (None, None)
    names = adapter.quantizable_layers(model)
    plan = resolve_layer_bits(names, *adapter.first_last_layers(model), Recipe(weight=QuantSpec(4, False)))
    assert {item.weight_bits for item in plan} == {4}  # the bit policy's 8-bit first / last rule touches none
    head = TransformersAdapter(TransformersAdapter.Config(quantize_head=True))
    assert head.first_last_layers(model) == (None, "lm_head")


def test_text_is_tokenized_in_one_piece_for_sentencepiece_style_tokenizers() -> None:
    """A Metaspace tokenizer marks the start of each call: tokenizing paragraph by paragraph would insert a
    word-start marker before every paragraph."""
    from quantplug_transformers import sources
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = tiny_models.sample_text()[:4000]
    assert text.count("\n\n") >= 3
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator([text], trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"],
                                                                show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    whole = fast(text, add_special_tokens=False)["input_ids"]
    assert sources._tokenize(fast, text).tolist() == whole
    pieces = [p for p in re.split(r"(?<!\n)(?=\n\n)", text) if p]  # each paragraph with its blank line
    by_paragraph = sum((fast(p, add_special_tokens=False)["input_ids"] for p in pieces), [])
    assert by_paragraph != whole  # the case the one-piece tokenization exists for
