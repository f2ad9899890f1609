"""Where the parts of a Hugging Face model live: embeddings, the stack of transformer layers, the head.

A ``Layout`` names the submodules of one model family. The reconstruction chain is then
``embed`` (everything before the first layer, full precision), one block per transformer layer, and
``head`` (final norm, output projection and task head) when the model has one.

Families: BERT (``BertModel`` and ``BertFor*``), OPT, GPT-Neo, and LLaMA-style decoders (any model
with ``model.embed_tokens``, ``model.layers``, ``model.norm`` and ``lm_head``: LLaMA, Mistral,
Qwen2, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantplug.errors import ModelLoadError


@dataclass(frozen=True)
class Layout:
    """Qualified submodule names of one model."""

    family: str
    #: the embedding modules (run by the model's own forward up to the first layer)
    embed: tuple[str, ...]
    #: the ModuleList of transformer layers
    layers: str
    #: the modules after the last layer, in order (final norm, projections, head); () for encoders
    head: tuple[str, ...]
    #: the output projection to the vocabulary or the task head (full precision by default)
    output: str | None
    causal: bool


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _present(model: nn.Module, *names: str) -> tuple[str, ...]:
    return tuple(n for n in names if _has(model, n))


def bert_layout(model: nn.Module) -> Layout:
    base = "bert." if _has(model, "bert") else ""
    embed = (f"{base}embeddings",)
    layers = f"{base}encoder.layer"
    cls = type(model).__name__
    if cls == "BertModel":
        return Layout("bert", embed, layers, (), None, causal=False)
    if cls == "BertForSequenceClassification" or cls == "BertForMultipleChoice":
        if not _has(model, "bert.pooler"):
            raise ModelLoadError(f"{cls} without a pooler is not supported")
        return Layout("bert", embed, layers, ("bert.pooler", "dropout", "classifier"), "classifier", causal=False)
    if cls == "BertForTokenClassification":
        return Layout("bert", embed, layers, ("dropout", "classifier"), "classifier", causal=False)
    if cls == "BertForMaskedLM" or cls == "BertLMHeadModel":
        return Layout("bert", embed, layers, ("cls.predictions.transform", "cls.predictions.decoder"),
                      "cls.predictions.decoder", causal=cls == "BertLMHeadModel")
    if cls == "BertForQuestionAnswering":
        return Layout("bert", embed, layers, ("qa_outputs",), "qa_outputs", causal=False)
    raise ModelLoadError(f"{cls} is not supported; supported BERT classes: BertModel, BertForSequenceClassification, "
                         "BertForTokenClassification, BertForMaskedLM, BertForQuestionAnswering")


def opt_layout(model: nn.Module) -> Layout:
    base = "model.decoder" if _has(model, "model.decoder") else "decoder"
    embed = _present(model, f"{base}.embed_tokens", f"{base}.embed_positions", f"{base}.project_in")
    head = _present(model, f"{base}.final_layer_norm", f"{base}.project_out", "lm_head")
    return Layout("opt", embed, f"{base}.layers", head, "lm_head" if _has(model, "lm_head") else None, causal=True)


def gptneo_layout(model: nn.Module) -> Layout:
    base = "transformer" if _has(model, "transformer") else ""
    pre = f"{base}." if base else ""
    embed = (f"{pre}wte", f"{pre}wpe")
    head = _present(model, f"{pre}ln_f", "lm_head")
    return Layout("gptneo", embed, f"{pre}h", head, "lm_head" if _has(model, "lm_head") else None, causal=True)


def llama_layout(model: nn.Module) -> Layout:
    base = "model" if _has(model, "model.layers") else ""
    pre = f"{base}." if base else ""
    embed = _present(model, f"{pre}embed_tokens", f"{pre}rotary_emb")
    head = _present(model, f"{pre}norm", "lm_head")
    return Layout("llama", embed, f"{pre}layers", head, "lm_head" if _has(model, "lm_head") else None, causal=True)


def layout_of(model: nn.Module) -> Layout:
    """The layout of a supported model, or an error naming the supported families."""
    cls = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type == "bert" or cls.startswith("Bert"):
        return bert_layout(model)
    if model_type == "opt" or cls.startswith("OPT"):
        return opt_layout(model)
    if model_type == "gpt_neo" or cls.startswith("GPTNeo"):
        return gptneo_layout(model)
    if (_has(model, "model.layers") or _has(model, "layers")) and (_has(model, "model.embed_tokens")
                                                                  or _has(model, "embed_tokens")):
        return llama_layout(model)
    raise ModelLoadError(
        f"{cls} (model_type {model_type!r}) is not supported: the transformers adapter knows BERT, OPT, GPT-Neo "
        "and LLaMA-style decoders (model.embed_tokens / model.layers / model.norm / lm_head)"
    )


def linear_layers(model: nn.Module, prefix: str) -> tuple[str, ...]:
    """Qualified names of the nn.Linear layers (or already swapped quantized layers) under ``prefix``."""
    module = model.get_submodule(prefix)
    out = []
    for sub, m in module.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "QuantLinear":
            out.append(f"{prefix}.{sub}" if sub else prefix)
    return tuple(out)
