"""Text data sources: token windows of a fixed length from the Austen corpus or from text files.

Specs (options after ``?``, joined with ``&``):

* ``austen?tokenizer=MODEL_ID[&length=128][&source=auto|embedded|debian][&reference=MODEL_ID]``:
  Jane Austen's novels (``quantplug_transformers.corpus``): five novels for calibration, *Persuasion*
  held out;
* ``text:PATH?tokenizer=MODEL_ID[&length=128][&test=PATH][&test_fraction=0.1][&reference=MODEL_ID]``:
  a UTF-8 file or a directory of ``*.txt`` files; the held-out text is ``test`` or the last
  ``test_fraction`` of the text.

``tokenizer`` is a model id (``zoo:opt-austen``, ``hf:ORG/NAME``, ``local:DIR``) whose tokenizer cuts
the text. The tokenized text is split into windows of ``length`` tokens (special tokens such as BERT's
[CLS] / [SEP] included, no padding). Calibration (split ``train``) draws ``num_samples`` windows at
random offsets with the seed; evaluation (split ``test``) uses consecutive non-overlapping windows,
the first ``num_samples`` of them. Each sample is ``(ids, target)``: the target is ``ids`` (causal
LMs), or with ``reference`` the full-precision output of that model on the window: the mean-pooled
last hidden state of an encoder (embedding fidelity) or the logits of a task head.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch.utils.data import Dataset, TensorDataset

from quantplug.errors import DataError, ModelLoadError
from quantplug.interfaces import DataSource
from quantplug_transformers import corpus

logger = logging.getLogger(__name__)

DEFAULT_LENGTH = 128
KNOWN_OPTIONS = {"tokenizer", "length", "source", "reference", "test", "test_fraction"}


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``NAME[:PATH][?k=v&...]`` -> (name, path, options)."""
    head, _, query = spec.partition("?")
    name, _, path = head.partition(":")
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise DataError(f"unknown option(s) {sorted(unknown)} in {spec!r}; known: {sorted(KNOWN_OPTIONS)}")
    return name, path, options


def window_length(options: Mapping[str, str]) -> int:
    try:
        length = int(options.get("length", DEFAULT_LENGTH))
    except ValueError:
        raise DataError(f"length must be an integer, not {options['length']!r}") from None
    if length < 4:
        raise DataError(f"length must be at least 4 tokens, not {length}")
    return length


@lru_cache(maxsize=8)
def load_tokenizer(model_id: str) -> Any:
    """The tokenizer stored with ``model_id`` (a transformers fast or slow tokenizer)."""
    from transformers import AutoTokenizer

    from quantplug_transformers.hub import resolve_model_dir

    directory = resolve_model_dir(model_id)
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise ModelLoadError(f"{model_id} ({directory}) has no usable tokenizer: {exc}") from exc


def token_stream(tokenizer: Any, text: str) -> torch.Tensor:
    """All token ids of ``text`` (no special tokens), tokenized paragraph by paragraph (cached per process).

    A lossless tokenizer (byte-level BPE) decodes the stream back to the text."""
    key = (id(tokenizer), hash(text))
    if key not in _STREAMS:
        if len(_STREAMS) >= 4:  # a few texts per process (train and test of one or two tokenizers)
            _STREAMS.pop(next(iter(_STREAMS)))
        _STREAMS[key] = _tokenize(tokenizer, text)
    return _STREAMS[key]


_STREAMS: dict[tuple[int, int], torch.Tensor] = {}


def _tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    import logging as std_logging

    # the text in one piece, as OPTQ tokenizes WikiText-2: tokenizing paragraph by paragraph gives the same
    # stream for byte-level BPE but not for SentencePiece / Metaspace tokenizers, which mark each call's start
    if not text.strip():
        raise DataError("the text is empty")
    tf_logger = std_logging.getLogger("transformers.tokenization_utils_base")
    level = tf_logger.level
    tf_logger.setLevel(std_logging.ERROR)  # "sequence longer than the model's maximum": we cut windows ourselves
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        tf_logger.setLevel(level)
    return torch.tensor(ids, dtype=torch.long)


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (BERT: [CLS] / [SEP]; OPT, LLaMA: BOS)."""
    probe = "the house"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise DataError("cannot tell the tokenizer's special tokens apart from the text it encodes")


def make_windows(stream: torch.Tensor, tokenizer: Any, length: int, split: str, num_samples: int | None,
                 seed: int) -> torch.Tensor:
    """``[N, length]`` windows: random offsets (train) or consecutive ones (test); specials added."""
    prefix, suffix = special_tokens(tokenizer)
    content = length - len(prefix) - len(suffix)
    if content < 2:
        raise DataError(f"length {length} leaves no room for text after {len(prefix) + len(suffix)} special tokens")
    if stream.numel() < content + 1:
        raise DataError(f"the text has {stream.numel()} tokens, fewer than one window of {content}")
    if split == "train" and num_samples is not None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, stream.numel() - content + 1, (num_samples,), generator=gen).tolist()
    else:
        starts = list(range(0, stream.numel() - content + 1, content))
        if num_samples is not None:
            starts = starts[:num_samples]
    rows = [prefix + stream[s:s + content].tolist() + suffix for s in starts]
    windows = torch.tensor(rows, dtype=torch.long)
    assert windows.shape[1] == length, windows.shape
    return windows


@torch.no_grad()
def reference_outputs(model_id: str, windows: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Full-precision outputs of ``model_id`` on ``windows``: pooled embedding [N, D] or head logits."""
    from quantplug_transformers.adapter import TransformersAdapter

    adapter = TransformersAdapter()
    model = adapter.load(model_id, device=torch.device("cpu"))
    if adapter.is_causal(model):
        raise DataError(f"reference={model_id} is a causal LM: its targets are the tokens, drop the option")
    outs = [adapter.reference_target(model, windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
    return torch.cat(outs)


def build_dataset(text: str, options: Mapping[str, str], split: str, num_samples: int | None,
                  seed: int) -> Dataset:
    if "tokenizer" not in options:
        raise DataError("text data needs a tokenizer: add ?tokenizer=MODEL_ID (e.g. austen?tokenizer=zoo:opt-austen)")
    length = window_length(options)
    tokenizer = load_tokenizer(options["tokenizer"])
    windows = make_windows(token_stream(tokenizer, text), tokenizer, length, split, num_samples, seed)
    if options.get("reference"):
        return TensorDataset(windows, reference_outputs(options["reference"], windows))
    return TensorDataset(windows, windows.clone())


def _split(split: str) -> str:
    if split not in ("train", "test"):
        raise DataError(f"split must be train or test, not {split!r}")
    return split


class AustenSource(DataSource):
    """Jane Austen's six novels (public domain): calibration on five, perplexity on *Persuasion*."""

    name = "austen"
    prefixes = ("austen",)

    def can_load(self, spec: str) -> bool:
        return spec.partition("?")[0].partition(":")[0] == "austen"

    def load(self, spec: str, split: str, *, num_samples: int | None, seed: int) -> Dataset:
        _, _, options = parse_spec(spec)
        text = corpus.austen_text(_split(split), options.get("source", "auto"))
        return build_dataset(text, options, split, num_samples, seed)


class TextFileSource(DataSource):
    """A UTF-8 text file or a directory of ``*.txt`` files, cut into token windows."""

    name = "text"
    prefixes = ("text",)

    def can_load(self, spec: str) -> bool:
        return spec.partition("?")[0].partition(":")[0] == "text"

    def load(self, spec: str, split: str, *, num_samples: int | None, seed: int) -> Dataset:
        _, path, options = parse_spec(spec)
        if not path:
            raise DataError("text data needs a path: text:FILE_OR_DIR?tokenizer=MODEL_ID")
        split = _split(split)
        text = corpus.read_text_path(path)
        if options.get("test"):
            if split == "test":
                text = corpus.read_text_path(options["test"])
        else:
            try:
                fraction = float(options.get("test_fraction", 0.1))
            except ValueError:
                raise DataError(f"test_fraction must be a number, not {options['test_fraction']!r}") from None
            if not 0.0 < fraction < 1.0:
                raise DataError(f"test_fraction must lie strictly between 0 and 1, not {fraction}")
            cut = int(len(text) * (1.0 - fraction))
            text = text[:cut] if split == "train" else text[cut:]
        return build_dataset(text, options, split, num_samples, seed)
