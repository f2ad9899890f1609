"""The ``imagefolder:`` data source on a tiny ImageNet-layout folder written here (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from quantplug_torchvision.adapter import TorchvisionAdapter
from quantplug_torchvision.image_folder import folder_transform
from quantplug_torchvision.sources import ImageFolderSource

from quantplug.api import apply
from quantplug.cli import main
from quantplug.errors import DataError
from quantplug.plugins import Session

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


def test_named_weights_bring_their_own_preprocessing(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.transforms import Compose, InterpolationMode

    monkeypatch.delenv("QUANTPLUG_RESIZE", raising=False)
    monkeypatch.delenv("QUANTPLUG_IMAGE_SIZE", raising=False)
    resnet = folder_transform("ResNet50_Weights.IMAGENET1K_V2")  # builds the preset only: nothing downloaded
    assert (resnet.resize_size, resnet.crop_size) == ([232], [224])
    assert resnet.interpolation == InterpolationMode.BILINEAR
    efficientnet = folder_transform("EfficientNet_B0_Weights.IMAGENET1K_V1")
    assert efficientnet.interpolation == InterpolationMode.BICUBIC
    plain = folder_transform(None)  # no weights: the classic resize 256 / crop 224 / bilinear
    assert isinstance(plain, Compose)
    assert (plain.transforms[0].size, plain.transforms[1].size) == (256, (224, 224))
    assert plain.transforms[0].interpolation == InterpolationMode.BILINEAR
    # the environment still overrides the sizes, and keeps the weights' interpolation
    monkeypatch.setenv("QUANTPLUG_RESIZE", "300")
    monkeypatch.setenv("QUANTPLUG_IMAGE_SIZE", "288")
    bigger = folder_transform("EfficientNet_B0_Weights.IMAGENET1K_V1")
    assert (bigger.resize_size, bigger.crop_size, bigger.interpolation) == ([300], [288], InterpolationMode.BICUBIC)
    assert folder_transform(None).transforms[0].size == 300
    with pytest.raises(DataError, match="ENUM.NAME"):
        folder_transform("ResNet50_Weights.NOPE")


def test_adapter_binds_the_weights_and_the_number_of_classes_to_a_folder_spec() -> None:
    adapter = TorchvisionAdapter()
    bind = adapter.bind_data
    assert bind("torchvision:resnet50", "imagefolder:/d", {"weights": "DEFAULT"}) == (
        "imagefolder:/d?weights=ResNet50_Weights.IMAGENET1K_V2&classes=1000")
    assert bind("torchvision:mobilenet_v2", "imagefolder:/d", {"weights": "DEFAULT"}) == (
        "imagefolder:/d?weights=MobileNet_V2_Weights.IMAGENET1K_V2&classes=1000")
    assert bind("torchvision:resnet50", "imagefolder:/d", {"weights": "IMAGENET1K_V1"}) == (
        "imagefolder:/d?weights=ResNet50_Weights.IMAGENET1K_V1&classes=1000")
    assert bind("torchvision:resnet18", "imagefolder:/d", {"num_classes": 3}) == "imagefolder:/d?classes=3"
    # options written in the spec win; other data and models of unknown width are left alone
    assert bind("torchvision:resnet50", "imagefolder:/d?classes=7", {"weights": "DEFAULT"}) == (
        "imagefolder:/d?weights=ResNet50_Weights.IMAGENET1K_V2&classes=7")
    assert bind("torchvision:resnet50", "fmnist:32", {"weights": "DEFAULT"}) == "fmnist:32"
    assert bind("torchvision:resnet18", "imagefolder:/d", {"weights": None}) == "imagefolder:/d"
    assert bind("local:/m.pt", "imagefolder:/d", {}) == "imagefolder:/d"


def test_folder_source_uses_the_bound_preprocessing(folder: Path) -> None:
    from torchvision.transforms._presets import ImageClassification

    dataset = ImageFolderSource().load(f"imagefolder:{folder}?weights=ResNet50_Weights.IMAGENET1K_V2&classes=3",
                                       "test", num_samples=None, seed=0)
    assert isinstance(dataset.transform, ImageClassification)  # type: ignore[attr-defined]
    assert dataset.transform.resize_size == [232]  # type: ignore[attr-defined]
    assert dataset[0][0].shape == (3, 224, 224)
    with pytest.raises(DataError, match="unknown option"):
        ImageFolderSource().load(f"imagefolder:{folder}?size=3", "test", num_samples=None, seed=0)


def test_folder_with_other_classes_than_the_model_is_refused(folder: Path) -> None:
    with pytest.raises(DataError, match="has 3 class directories but the model predicts 1000 classes: point --data"):
        ImageFolderSource().load(f"imagefolder:{folder}?classes=1000", "test", num_samples=None, seed=0)
    # what the review saw: --weights DEFAULT on a folder of a few classes; refused before any model is built
    with pytest.raises(DataError, match="has 3 class directories but the model predicts 1000"):
        apply("nearest", "torchvision:resnet50", data=f"imagefolder:{folder}", session=Session(),
              model_options={"weights": "DEFAULT"}, dry_run=True)


def test_apply_and_eval_bind_the_folder_to_the_model(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("QUANTPLUG_RESIZE", "16")  # small images keep the run short
    monkeypatch.setenv("QUANTPLUG_IMAGE_SIZE", "16")
    run = tmp_path / "run"
    result = apply("nearest", "torchvision:resnet18", data=f"imagefolder:{folder}", session=Session(),
                   model_options={"num_classes": len(CLASSES)}, out_dir=str(run),
                   overrides={"calib.num_samples": 8, "calib.batch_size": 4,  # min / max ranges: fast
                              "weight_observer.name": "minmax", "activation_observer.name": "minmax"})
    assert 0 <= result.quant_metrics["top1"] <= 100
    manifest = json.loads((run / "quantplug.json").read_text())
    assert manifest["data"] == f"imagefolder:{folder}"  # as given; eval binds it again
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == result.quant_metrics
    two = write_folder(tmp_path / "two", classes=CLASSES[:2])
    assert main(["eval", str(run), "--data", f"imagefolder:{two}"]) == 2
    assert "has 2 class directories but the model predicts 3 classes" in capsys.readouterr().err
