"""Image-folder specs and preprocessing: ``imagefolder:ROOT[?weights=ENUM.NAME][&classes=N]``.

* ``weights`` names torchvision weights (``ResNet50_Weights.IMAGENET1K_V2``): the images get that model's own
  evaluation preset, ``weights.transforms()`` (resize, center crop, interpolation, mean / std, e.g. resize 232
  for ResNet-50 V2 and MobileNetV2 V2, bicubic for EfficientNet; see torchvision's model documentation).
  Without it: resize 256, center crop 224, bilinear, ImageNet mean / std (the classic ResNet recipe of
  He et al., 2016). ``QUANTPLUG_RESIZE`` / ``QUANTPLUG_IMAGE_SIZE`` override the resize and crop sizes in
  both cases.
* ``classes`` is the number of classes the model predicts: a folder with another number of class
  directories is refused (torchvision's ImageFolder would relabel its K directories 0..K-1 and every
  accuracy would be meaningless).

The torchvision adapter adds both options for a model built with named weights (``--weights``) or with
``--num-classes`` (:meth:`TorchvisionAdapter.bind_data`); options written in the spec win.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from quantplug.errors import DataError

logger = logging.getLogger(__name__)

PREFIX = "imagefolder"
KNOWN_OPTIONS = ("weights", "classes")
RESIZE_ENV, SIZE_ENV = "QUANTPLUG_RESIZE", "QUANTPLUG_IMAGE_SIZE"
DEFAULT_RESIZE, DEFAULT_SIZE = 256, 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_folder_spec(spec: str) -> bool:
    return spec.startswith(PREFIX + ":")


def parse_folder_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``imagefolder:ROOT?k=v&...`` -> (ROOT, options); unknown options are a DataError."""
    head, _, query = spec.partition("?")
    root = head.partition(":")[2]
    if not root:
        raise DataError(f"{spec!r} names no directory: use imagefolder:ROOT (ROOT/train and ROOT/val of class folders)")
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    unknown = sorted(set(options) - set(KNOWN_OPTIONS))
    if unknown:
        raise DataError(f"unknown option(s) {unknown} in {spec!r}; known: {', '.join(KNOWN_OPTIONS)}")
    return root, options


def folder_spec(root: str, options: Mapping[str, Any]) -> str:
    """The spec of ``root`` with ``options`` (in :data:`KNOWN_OPTIONS` order)."""
    query = urlencode([(k, str(options[k])) for k in KNOWN_OPTIONS if options.get(k) not in (None, "")])
    return f"{PREFIX}:{root}" + (f"?{query}" if query else "")


def expected_classes(options: Mapping[str, str]) -> int | None:
    text = options.get("classes")
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"classes must be a positive integer, not {text!r}") from None
    if value < 1:
        raise DataError(f"classes must be a positive integer, not {value}")
    return value


def _env_size(name: str) -> int | None:
    text = os.environ.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{name} must be an integer number of pixels, not {text!r}") from None


def folder_transform(weights: str | None) -> Callable[[Any], Any]:
    """The preprocessing of a folder's images: the preset of ``weights`` (a torchvision weights name such as
    ``ResNet50_Weights.IMAGENET1K_V2``), or resize 256 / crop 224 / bilinear; the environment overrides the sizes."""
    from torchvision import models, transforms

    resize, size = _env_size(RESIZE_ENV), _env_size(SIZE_ENV)
    if weights:
        try:
            chosen = models.get_weight(weights)
        except (ValueError, KeyError) as exc:
            raise DataError(f"unknown torchvision weights {weights!r} in an imagefolder spec; name them as "
                            "ENUM.NAME, e.g. ResNet50_Weights.IMAGENET1K_V2") from exc
        overrides = {k: v for k, v in (("resize_size", resize), ("crop_size", size)) if v is not None}
        tf = chosen.transforms(**overrides)
        logger.info("images preprocessed as %s: %s", weights, " ".join(repr(tf).split()))
        return tf
    return transforms.Compose([
        transforms.Resize(resize or DEFAULT_RESIZE), transforms.CenterCrop(size or DEFAULT_SIZE),
        transforms.ToTensor(), transforms.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
    ])


def check_classes(path: str, found: int, expected: int | None) -> None:
    """Refuse a folder whose number of class directories is not the model's number of classes."""
    if expected is None or found == expected:
        return
    raise DataError(
        f"the folder {path} has {found} class directories but the model predicts {expected} classes: point --data "
        f"at the full folder (one directory per class, {expected} of them, named so that they sort in the "
        "model's class order, as ImageNet's synset ids n01440764... do), or pass a model with as many classes"
    )
