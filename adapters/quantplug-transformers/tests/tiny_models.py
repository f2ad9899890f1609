"""Tiny Hugging Face models (random weights) with a small byte-level BPE tokenizer, saved to a directory.

Built once per test process under a temporary directory; every model shares one tokenizer trained on
a few paragraphs of Austen, so ``austen?tokenizer=local:DIR`` and ``text:`` specs work with them.
"""

from __future__ import annotations

import tempfile
from functools import cache, lru_cache
from pathlib import Path

import torch
from quantplug_transformers import corpus

VOCAB = 320
FAMILIES = ("opt", "gptneo", "bert", "bert-seqcls", "llama")


@lru_cache(maxsize=1)
def sample_text() -> str:
    return corpus.austen_text("test")[:20_000]


@lru_cache(maxsize=1)
def root() -> Path:
    return Path(tempfile.mkdtemp(prefix="qp-transformers-tiny-"))


def _tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "[CLS]", "[SEP]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([sample_text()], trainer=trainer)
    if "bert" in directory.name:  # BERT-style windows: [CLS] text [SEP]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                     ("[SEP]", tok.token_to_id("[SEP]"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", cls_token="[CLS]", sep_token="[SEP]")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>", bos_token="<pad>")
    fast.save_pretrained(str(directory))


def build(family: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if family == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                              num_attention_heads=2, max_position_embeddings=64,
                                              word_embed_proj_dim=32, pad_token_id=0, bos_token_id=0,
                                              eos_token_id=0))
    if family == "gptneo":
        return tf.GPTNeoForCausalLM(tf.GPTNeoConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32,
                                                    num_layers=2, attention_types=[[["global", "local"], 1]],
                                                    num_heads=2, intermediate_size=64, window_size=8))
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=64, pad_token_id=0))
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, num_labels=3)
    if family == "bert-seqcls":
        return tf.BertForSequenceClassification(config)
    return tf.BertModel(config)


@cache
def model_dir(family: str) -> Path:
    """A save_pretrained directory of a tiny ``family`` model with its tokenizer."""
    directory = root() / family
    directory.mkdir(parents=True, exist_ok=True)
    model = build(family)
    model.eval()
    model.save_pretrained(str(directory))
    _tokenizer(directory)
    return directory


@lru_cache(maxsize=1)
def text_file() -> Path:
    path = root() / "sample.txt"
    path.write_text(sample_text())
    return path


def model_id(family: str) -> str:
    return f"local:{model_dir(family)}"


def data_spec(family: str, length: int = 32) -> str:
    spec = f"text:{text_file()}?tokenizer={model_id(family)}&length={length}"
    return spec if family in ("opt", "gptneo", "llama") else f"{spec}&reference={model_id(family)}"
