"""Synthetic, deterministic data for the tiny models: class-template images and Markov-chain tokens."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

IMAGE_SHAPE = (3, 16, 16)
NUM_CLASSES = 10
VOCAB = 64
SEQ_LEN = 16
_SPLIT_OFFSET = {"train": 0, "test": 1_000_003}


def _templates() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    coarse = torch.randn(NUM_CLASSES, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False)


def synthetic_images(n: int, split: str = "train", seed: int = 0) -> TensorDataset:
    """``n`` images of 10 classes: a smooth class template, randomly scaled and shifted, plus noise."""
    g = torch.Generator().manual_seed(seed + _SPLIT_OFFSET[split])
    labels = torch.randint(NUM_CLASSES, (n,), generator=g)
    base = _templates()[labels]
    amp = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    images = torch.empty_like(base)
    for i in range(n):
        images[i] = torch.roll(base[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
    images = amp * images + 2.2 * torch.randn(images.shape, generator=g)
    return TensorDataset(images, labels)


def _transition_matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(4321)
    logits = torch.randn(VOCAB, VOCAB, generator=g) * 3.0
    return torch.softmax(logits, dim=1)


def synthetic_tokens(n: int, split: str = "train", seed: int = 0) -> TensorDataset:
    """``n`` sequences of ``SEQ_LEN + 1`` tokens from a fixed Markov chain; (inputs, next-token targets)."""
    g = torch.Generator().manual_seed(seed + _SPLIT_OFFSET[split])
    probs = _transition_matrix()
    seq = torch.empty(n, SEQ_LEN + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(VOCAB, (n,), generator=g)
    for t in range(1, SEQ_LEN + 1):
        seq[:, t] = torch.multinomial(probs[seq[:, t - 1]], 1, generator=g).squeeze(1)
    return TensorDataset(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())
