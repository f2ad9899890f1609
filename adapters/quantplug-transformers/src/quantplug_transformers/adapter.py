"""The Hugging Face transformers model adapter: BERT, OPT, GPT-Neo and LLaMA-style decoders.

Model ids (``quantplug_transformers.hub``): ``hf:ORG/NAME``, ``hf:DIR`` / ``local:DIR`` and ``zoo:NAME``
(``zoo:opt-austen``, ``zoo:gptneo-austen``, ``zoo:minilm``).

Units: the embeddings (full precision), each transformer layer, and the head. Linear layers inside
the transformer layers are quantized (per-tensor, per-channel or per-group as the recipe's ``QuantSpec``
says; the host swaps them); embeddings and the output projection / task head stay in full precision
unless ``quantize_head`` is set. A layer is run with the hidden state only: the attention mask, position
ids and other keyword inputs the model passes to it are captured from the model (``units.LayerUnit``).

Task losses and metrics:

* causal LMs: next-token cross entropy; perplexity = exp(mean NLL) over the windows' predicted tokens,
  as FlexRound (Lee et al., ICML 2023) and OPTQ report it on WikiText-2 with non-overlapping windows
  (labels -100 are not predicted and not counted);
* encoders given integer token targets (token classification labels, or masked-LM targets with -100 at
  the unmasked positions): per-token cross entropy and ``token_accuracy`` over the labels that are not -100;
* encoders without a head (``BertModel``): the sentence embedding is the mean of the last hidden state
  (all-MiniLM-L6-v2's pooling); the metric ``embedding_cosine`` is its cosine to the full-precision
  embedding (the data's ``reference`` targets), the loss ``1 - cosine``;
* encoders with a task head (``BertFor*``): ``agreement`` (top-1 equal to the full-precision model's)
  and ``logit_cosine`` against reference logits, or ``accuracy`` when the data carries integer labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.errors import ConfigError, DataError, ModelLoadError
from quantplug.interfaces import ModelAdapter, UnitSpec
from quantplug.tensors import to_device as _to
from quantplug_transformers import hub
from quantplug_transformers.structure import Layout, layout_of, linear_layers
from quantplug_transformers.units import EmbeddingUnit, HeadUnit, LayerUnit, first_tensor


class TransformersAdapter(ModelAdapter):
    """Hugging Face BERT / OPT / GPT-Neo / LLaMA-style models: perplexity, embedding fidelity, task accuracy."""

    name = "transformers"
    prefixes = ("hf", "local", "zoo")
    #: no default model: ``quantplug apply`` without a model keeps the image default (torchvision zoo / testing)
    default_model = None

    @dataclass(frozen=True)
    class Config:
        """``quantize_head``: quantize the output projection / task head too (default full precision);
        ``attn_implementation``: transformers' attention kernel (``sdpa``, ``eager``; empty: its default)."""

        quantize_head: bool = False
        attn_implementation: str = ""

    # ------------------------------------------------------------------ ids and loading
    def can_load(self, model_id: str) -> bool:
        source, sep, rest = model_id.partition(":")
        if not sep:
            return False
        if source == "zoo":
            return rest in hub.zoo_names()
        if source == "local":
            return hub.is_model_dir(rest)
        return source == "hf"

    def load(self, model_id: str, *, device: torch.device, options: Mapping[str, Any] | None = None) -> nn.Module:
        options = dict(options or {})
        directory = hub.resolve_model_dir(model_id)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(directory))
        except Exception as exc:
            raise ModelLoadError(f"{directory}/config.json is not a transformers config: {exc}") from exc
        auto = self._auto_class(config, options.get("task"))
        attn = str(options.get("attn_implementation", self.config.attn_implementation))
        extra = {"attn_implementation": attn} if attn else {}
        try:
            model = auto.from_pretrained(str(directory), dtype=torch.float32, **extra)
        except Exception as exc:
            raise ModelLoadError(f"could not load {model_id} from {directory}: {exc}") from exc
        layout_of(model)  # fail early on an unsupported family
        return model.to(device).eval()

    @staticmethod
    def _auto_class(config: Any, task: Any) -> Any:
        import transformers

        architectures = list(getattr(config, "architectures", None) or [])
        if task:
            names = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
                     "sequence-classification": "AutoModelForSequenceClassification",
                     "token-classification": "AutoModelForTokenClassification", "base": "AutoModel"}
            if task not in names:
                raise ConfigError(f"unknown task {task!r}; use one of {sorted(names)}")
            return getattr(transformers, names[task])
        if architectures and hasattr(transformers, architectures[0]):
            return getattr(transformers, architectures[0])
        return transformers.AutoModel

    def default_data(self, model_id: str) -> str | None:
        reference = "" if self._is_causal_id(model_id) else f"&reference={model_id}"
        return f"austen?tokenizer={model_id}&length=128{reference}"

    def _is_causal_id(self, model_id: str) -> bool:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(hub.resolve_model_dir(model_id)))
        archs = " ".join(getattr(config, "architectures", None) or [])
        return "CausalLM" in archs or bool(getattr(config, "is_decoder", False))

    # ------------------------------------------------------------------ structure
    def layout(self, model: nn.Module) -> Layout:
        return layout_of(model)

    def is_causal(self, model: nn.Module) -> bool:
        return self.layout(model).causal

    def blocks(self, model: nn.Module) -> list[UnitSpec]:
        lay = self.layout(model)
        layers = model.get_submodule(lay.layers)
        blocks = [UnitSpec("embed", lay.embed, (), stage="embed", kind="embedding")]
        for i in range(len(layers)):  # type: ignore[arg-type]
            name = f"{lay.layers}.{i}"
            blocks.append(UnitSpec(name, (name,), linear_layers(model, name), stage="layers"))
        if lay.head:
            quantize = self.config.quantize_head
            head_layers = tuple(n for m in lay.head for n in linear_layers(model, m)) if quantize else ()
            blocks.append(UnitSpec("head", lay.head, head_layers, stage="head", kind="head"))
        return blocks

    def quantizable_layers(self, model: nn.Module) -> list[str]:
        names = [n for b in self.blocks(model) for n in b.layers]
        return [n for n in names if type(model.get_submodule(n)).__name__ != "QuantLinear"]

    def block_module(self, model: nn.Module, block: UnitSpec) -> nn.Module:
        lay = self.layout(model)
        layers = model.get_submodule(lay.layers)
        if block.kind == "embedding":
            return EmbeddingUnit(model, layers[0], self._run_prefix,  # type: ignore[index]
                                 tuple(model.get_submodule(n) for n in block.modules))
        if block.kind == "head":
            return HeadUnit(tuple(model.get_submodule(n) for n in block.modules))
        vocab = int(getattr(model.config, "vocab_size", 8))  # type: ignore[union-attr]
        return LayerUnit(model, model.get_submodule(block.modules[0]), self._run_prefix, vocab)

    def fold_batchnorm(self, model: nn.Module) -> nn.Module:
        return model  # transformers have LayerNorm / RMSNorm, nothing to fold

    # ------------------------------------------------------------------ forward
    def _run_prefix(self, model: nn.Module, ids: torch.Tensor) -> Any:
        return self.forward(model, ids)

    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        inputs, targets = batch
        return _to(inputs, device), _to(targets, device)

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        kwargs = dict(inputs) if isinstance(inputs, Mapping) else {"input_ids": inputs}
        causal = self.is_causal(model)
        # token targets mean next-token prediction for a causal model, per-token labels for an encoder: the
        # losses and metrics below are given outputs and targets only, so the last forward's model decides
        self._causal_outputs = causal
        if hasattr(model.config, "use_cache") and causal:  # type: ignore[union-attr]
            kwargs["use_cache"] = False
        out = model(**kwargs)
        if getattr(out, "logits", None) is not None:
            return out.logits
        if getattr(out, "start_logits", None) is not None:
            # [N, 2, L]: the answer's start and end are each an argmax over the tokens
            return torch.stack([out.start_logits, out.end_logits], 1)
        return first_tensor(out)

    @torch.no_grad()
    def reference_target(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The full-precision target of an encoder: its pooled embedding, or its head's logits."""
        out = self.forward(model, ids)
        if not self.layout(model).head:
            return out.mean(1)  # all tokens count: windows have no padding
        return out.float()

    # ------------------------------------------------------------------ losses and metrics
    def _next_token_targets(self, outputs: torch.Tensor, targets: Any) -> bool | None:
        """True: next-token targets of a causal LM; False: per-token labels of an encoder; None: other targets.
        Without a forward through this adapter yet, token targets are taken as a causal LM's."""
        if not _is_token_targets(outputs, targets):
            return None
        return bool(getattr(self, "_causal_outputs", True))

    def task_loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        next_token = self._next_token_targets(outputs, targets)
        if next_token:
            return nn.functional.cross_entropy(outputs[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten())
        if next_token is False:
            return nn.functional.cross_entropy(outputs.flatten(0, 1).float(), targets.flatten())
        if not targets.is_floating_point():
            return nn.functional.cross_entropy(_last_dim_logits(outputs), targets.flatten())
        pred = _pooled(outputs, targets)
        return 1.0 - nn.functional.cosine_similarity(pred.flatten(1), targets.flatten(1), dim=1).mean()

    def metrics(self, outputs: torch.Tensor, targets: Any) -> dict[str, float]:
        next_token = self._next_token_targets(outputs, targets)
        if next_token:
            logits = outputs[:, :-1].flatten(0, 1).float()
            labels = targets[:, 1:].flatten()
            nll = nn.functional.cross_entropy(logits, labels, reduction="sum")  # -100 labels are skipped
            return {"nll": float(nll), "count": float((labels != IGNORED_LABEL).sum())}
        if next_token is False:
            labels = targets.flatten()
            scored = labels != IGNORED_LABEL
            correct = (outputs.flatten(0, 1).argmax(-1) == labels) & scored
            return {"token_accuracy": 100.0 * float(correct.sum()), "count": float(scored.sum())}
        if not targets.is_floating_point():
            logits = _last_dim_logits(outputs)
            labels = targets.flatten()
            return {"accuracy": 100.0 * float((logits.argmax(-1) == labels).sum()), "count": float(labels.numel())}
        pred = _pooled(outputs, targets)
        n = float(targets.shape[0])
        cos = nn.functional.cosine_similarity(pred.flatten(1).float(), targets.flatten(1).float(), dim=1)
        if outputs.dim() == 3 and targets.dim() == 2 and targets.shape[-1] == outputs.shape[-1]:
            return {"embedding_cosine": float(cos.sum()), "count": n}
        agree = (pred.argmax(-1) == targets.argmax(-1)).float().reshape(pred.shape[0], -1).mean(1)
        return {"agreement": 100.0 * float(agree.sum()), "logit_cosine": float(cos.sum()), "count": n}

    def first_last_layers(self, model: nn.Module) -> tuple[str | None, str | None]:
        """No exceptions: every linear layer of the transformer layers gets the recipe's bits, as in the
        papers (OPTQ, FlexRound); the output projection / head stays in full precision unless
        ``quantize_head``, and then its layer is the one the bit policy keeps at 8 bits (the host's
        convention for a network's last layer). The host's default (first and last quantizable layer)
        would pick an arbitrary projection of the first layer (OPT registers k_proj first)."""
        if not self.config.quantize_head:
            return (None, None)
        head = [n for m in self.layout(model).head for n in linear_layers(model, m)]
        return (None, head[-1] if head else None)

    def finalize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        out = super().finalize_metrics(sums)
        if "nll" in out:
            out["perplexity"] = math.exp(out.pop("nll"))
        return out


#: the label cross entropy ignores (transformers' convention for positions that are not scored)
IGNORED_LABEL = -100


def _is_token_targets(outputs: torch.Tensor, targets: Any) -> bool:
    return (isinstance(targets, torch.Tensor) and not targets.is_floating_point() and outputs.dim() == 3
            and targets.dim() == 2 and targets.shape == outputs.shape[:2])


def _last_dim_logits(outputs: torch.Tensor) -> torch.Tensor:
    return outputs.reshape(-1, outputs.shape[-1]).float()


def _pooled(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean-pool token states to match [N, D] embedding targets; other outputs pass through."""
    if outputs.dim() == 3 and targets.dim() == 2 and targets.shape[-1] == outputs.shape[-1]:
        return outputs.mean(1)
    if outputs.shape != targets.shape:
        raise DataError(f"reference targets of shape {tuple(targets.shape)} do not match outputs "
                        f"{tuple(outputs.shape)}: build the data with reference= the same model")
    return outputs
