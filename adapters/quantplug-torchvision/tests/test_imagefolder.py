"""The ``imagefolder:`` data source on a tiny ImageNet-layout folder written here (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from quantplug_torchvision.sources import ImageFolderSource

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 4


def write_folder(root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = PER_CLASS, size: int = 8) -> Path:
    """``root/train`` and ``root/val`` with ``per_class`` ``size`` x ``size`` PNGs per class directory."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for name in classes:
            directory = root / split / name
            directory.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(directory / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "images")


def labels(dataset: torch.utils.data.Dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


def test_evaluation_subset_covers_the_classes_and_ignores_the_run_seed(folder: Path) -> None:
    source = ImageFolderSource()
    spec = f"imagefolder:{folder}"
    full = source.load(spec, "test", num_samples=None, seed=0)
    assert labels(full) == [c for c in range(len(CLASSES)) for _ in range(PER_CLASS)]  # sorted by class
    subset = source.load(spec, "test", num_samples=3, seed=0)
    assert len(subset) == 3
    assert len(set(labels(subset))) > 1  # the first 3 images would all be class 0
    # the same images for any run seed (the full-precision and quantized models, every run)
    again = source.load(spec, "test", num_samples=3, seed=7)
    assert again.indices == subset.indices  # type: ignore[attr-defined]
    assert list(subset.indices) == sorted(subset.indices)  # type: ignore[attr-defined]
