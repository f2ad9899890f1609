"""Image data sources: Fashion-MNIST (full or the embedded subset), ImageFolder directories, tensor files.

Specs:

* ``fmnist[:SIZE]``: the 60 000 / 10 000 Fashion-MNIST images (Debian package ``dataset-fashion-mnist``,
  ``$QUANTPLUG_FASHION_MNIST`` or a torchvision root), preprocessed to SIZE x SIZE (default 32);
* ``fmnist-subset[:SIZE]``: 512 training and 1 000 test images shipped inside this package;
* ``imagefolder:DIR[?weights=ENUM.NAME][&classes=N]``: ImageNet layout ``DIR/train/<class>/*.jpg`` and
  ``DIR/val/<class>/*.jpg``, preprocessed with the named torchvision weights' own preset, else resized to 256,
  center-cropped to 224 (bilinear) and normalized with the ImageNet mean / std (``QUANTPLUG_IMAGE_SIZE`` /
  ``QUANTPLUG_RESIZE`` change the sizes); a folder with other than N class directories is refused
  (:mod:`quantplug_torchvision.image_folder`);
* ``tensors:FILE``: ``torch.save({"train": (x, y), "test": (x, y)})`` or a single ``(x, y)`` for both splits.

Calibration samples come from the training split, drawn with the seed; evaluation uses the test split: with
a sample limit, its first N samples, except for image folders (sorted by class), where N samples are drawn
with the fixed seed 0 (the same images for every run seed and for the full-precision and quantized models).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from quantplug.errors import DataError
from quantplug.interfaces import DataSource
from quantplug_torchvision.image_folder import check_classes, expected_classes, folder_transform, parse_folder_spec

logger = logging.getLogger(__name__)

#: the seed of an image folder's evaluation subset: fixed, so every run and both models see the same images
EVAL_SUBSET_SEED = 0


def check_calibration_size(available: int, requested: int | None, spec: str) -> None:
    """Refuse an empty calibration split; warn when it has fewer samples than were asked for."""
    if available == 0:
        raise DataError(f"the calibration (train) split of {spec} is empty: give data with training samples")
    if requested is not None and requested > available:
        logger.warning("%s has only %d calibration samples: using %d, not the %d asked for (--calib-samples)",
                       spec, available, available, requested)


def _pick(dataset: Dataset, num_samples: int | None, seed: int, split: str, *, spread_test: bool = False,
          spec: str = "the data") -> Dataset:
    """``num_samples`` samples of ``dataset`` (all of them when None or at least its size).

    Calibration (``train``) draws them with ``seed``. Evaluation (``test``) takes the first N, the same for
    every seed, or with ``spread_test`` N drawn with the fixed :data:`EVAL_SUBSET_SEED` (in file order): an
    ImageFolder lists its images class by class, so its first N would cover only the first classes.
    """
    if num_samples is not None and num_samples < 1:
        raise DataError(f"the number of {split} samples must be at least 1, not {num_samples}")
    n = len(dataset)  # type: ignore[arg-type]
    if split == "train":
        check_calibration_size(n, num_samples, spec)
    if num_samples is None or num_samples >= n:
        return dataset
    if split == "test":
        if not spread_test:  # the first N (committed fmnist / tensor-file numbers were measured this way)
            return Subset(dataset, range(num_samples))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(EVAL_SUBSET_SEED))[:num_samples]
        return Subset(dataset, sorted(perm.tolist()))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_samples]
    return Subset(dataset, perm.tolist())


def _split(split: str) -> str:
    if split not in ("train", "test"):
        raise DataError(f"split must be train or test, not {split!r}")
    return split


class FashionMNISTSource(DataSource):
    """Fashion-MNIST (Xiao et al., 2017): the full data set, or the subset embedded in this package."""

    name = "fmnist"
    prefixes = ("fmnist", "fmnist-subset")

    def load(self, spec: str, split: str, *, num_samples: int | None, seed: int) -> Dataset:
        from quantplug_torchvision import fashion_mnist as fm

        kind, _, size_text = spec.partition(":")
        try:
            size = int(size_text) if size_text else 32
        except ValueError:
            raise DataError(f"bad image size in {spec!r}; use e.g. fmnist:32") from None
        split = _split(split)
        if kind == "fmnist-subset":
            data = fm.load_subset()
            key = "calib" if split == "train" else "test"
            images, labels = data[f"{key}_images"], data[f"{key}_labels"]
        else:
            try:
                images, labels = fm.load_fashion_mnist(split)
            except FileNotFoundError as exc:
                raise DataError(str(exc)) from exc
        dataset = TensorDataset(fm.preprocess(images, size), torch.as_tensor(labels))
        return _pick(dataset, num_samples, seed, split, spec=spec)


class ImageFolderSource(DataSource):
    """Any ImageNet-layout directory (``train/`` and ``val/`` of class folders) via torchvision's ImageFolder;
    spec ``imagefolder:ROOT[?weights=ENUM.NAME][&classes=N]`` (:mod:`quantplug_torchvision.image_folder`)."""

    name = "imagefolder"
    prefixes = ("imagefolder",)

    def load(self, spec: str, split: str, *, num_samples: int | None, seed: int) -> Dataset:
        from torchvision import datasets

        root, options = parse_folder_spec(spec)
        sub = {"train": "train", "test": "val"}[_split(split)]
        path = os.path.join(root, sub)
        if not os.path.isdir(path):
            raise DataError(f"{path} does not exist: an ImageFolder root needs train/ and val/ class folders")
        expected = expected_classes(options)
        tf = folder_transform(options.get("weights"))
        try:
            dataset = datasets.ImageFolder(path, transform=tf)
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"no images found under {path}: {exc}") from exc
        check_classes(path, len(dataset.classes), expected)
        return _pick(dataset, num_samples, seed, split, spread_test=True, spec=spec)


def load_failure_reason(exc: BaseException) -> str:
    """The one-line reason of a failed ``torch.load(weights_only=True)``, without torch's advice to retry with
    ``weights_only=False`` (which runs arbitrary code from the file)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    _, marker, detail = text.partition("WeightsUnpickler error:")
    if marker:
        text = detail
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return first.split(". ")[0].rstrip(".")


class TensorFileSource(DataSource):
    """Tensors saved with ``torch.save``: ``{"train": (x, y), "test": (x, y)}`` or one ``(x, y)`` pair."""

    name = "tensors"
    prefixes = ("tensors",)

    def load(self, spec: str, split: str, *, num_samples: int | None, seed: int) -> Dataset:
        path = spec.partition(":")[2]
        if not os.path.isfile(path):
            raise DataError(f"tensor file {path!r} does not exist")
        try:
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"{path} is not a readable torch.save file of tensors ({load_failure_reason(exc)}); "
                            "write it again with torch.save({'train': (x, y), 'test': (x, y)}) holding only "
                            "tensors") from exc
        if isinstance(obj, dict):
            if _split(split) not in obj:
                raise DataError(f"{path} has no {split!r} entry; keys: {sorted(obj)}")
            obj = obj[split]
        if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
            raise DataError(f"{path} must hold (inputs, targets) tensors")
        x, y = obj
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise DataError(f"{path} contains NaN or inf inputs; clean the data first")
        return _pick(TensorDataset(x, y), num_samples, seed, split, spec=spec)
