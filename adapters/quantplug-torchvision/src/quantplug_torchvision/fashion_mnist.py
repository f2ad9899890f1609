"""Fashion-MNIST loading and preprocessing, pure Python + numpy (no torchvision download code).

The raw files are the four gzipped IDX files distributed with Fashion-MNIST::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

They are looked up, in order, in

1. an explicit ``root`` argument,
2. the directory named by ``$QUANTPLUG_FASHION_MNIST``,
3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``),
4. a torchvision root layout ``ROOT/FashionMNIST/raw/`` for ``ROOT`` among the locations above
   (gzipped or already gunzipped files).

For each location, both the flat layout and the torchvision layout are tried, and both the ``.gz`` and the
gunzipped file names are accepted.

No network access is ever attempted.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "CLASSES",
    "DEBIAN_ROOT",
    "ENV_VAR",
    "MEAN",
    "STD",
    "FashionMNISTNotFoundError",
    "find_root",
    "load_fashion_mnist",
    "load_subset",
    "preprocess",
    "read_idx",
]

ENV_VAR = "QUANTPLUG_FASHION_MNIST"
DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"

#: Class names, index = label.
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Per-pixel mean and standard deviation of the 60 000 *training* images, on the [0, 1] scale
#: (pixel / 255), computed over all 60000*28*28 pixels of the unpadded images:
#: mean = 0.28604060, std = 0.35302424. Used by :func:`preprocess` for all splits.
MEAN = 0.2860406
STD = 0.3530242

_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

_NOT_FOUND_HELP = (
    "Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist` "
    "(or `apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb DIR` and use "
    "DIR/usr/share/datasets/fashion-mnist), or set QUANTPLUG_FASHION_MNIST to the directory holding the "
    "*-ubyte(.gz) files / pass a root."
)

# IDX element type codes -> numpy dtypes (all big-endian on disk).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class FashionMNISTNotFoundError(FileNotFoundError):
    """Raised when the Fashion-MNIST IDX files cannot be located."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzipped if the name ends in ``.gz``) into a numpy array of its native shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    dtype = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: payload size {len(data) - header} does not match shape {shape}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _candidate_roots(root: str | os.PathLike[str] | None) -> list[Path]:
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root))
    env = os.environ.get(ENV_VAR)
    if env:
        bases.append(Path(env))
    bases.append(Path(DEBIAN_ROOT))
    dirs: list[Path] = []
    for base in bases:
        # flat layout first, then the torchvision layout ROOT/FashionMNIST/raw/
        dirs.extend([base, base / "FashionMNIST" / "raw"])
    return dirs


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    return None


def find_root(root: str | os.PathLike[str] | None = None, splits: Iterable[str] = ("train", "test")) -> Path:
    """Return the first directory holding the image and label files of all requested ``splits``."""
    splits = tuple(splits)
    tried = []
    for d in _candidate_roots(root):
        tried.append(str(d))
        if all(_find_file(d, _FILES[(s, k)]) is not None for s in splits for k in ("images", "labels")):
            return d
    raise FashionMNISTNotFoundError(_NOT_FOUND_HELP + " Looked in: " + ", ".join(tried))


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split (``"train"``: 60 000 images, ``"test"``: 10 000 images).

    Returns ``(images, labels)``: ``images`` is uint8 of shape [N, 28, 28] (0 = black background),
    ``labels`` is int64 of shape [N] with values 0..9 (see :data:`CLASSES`).
    """
    if split in ("t10k", "val"):
        split = "test"
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = find_root(root, splits=(split,))
    images = read_idx(_find_file(d, _FILES[(split, "images")]))
    labels = read_idx(_find_file(d, _FILES[(split, "labels")]))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"unexpected image array {images.shape} {images.dtype} in {d}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels {labels.shape} do not match images {images.shape} in {d}")
    return np.ascontiguousarray(images), labels.astype(np.int64)


def load_subset() -> dict[str, np.ndarray]:
    """Load the small subset shipped inside the package (no external files needed).

    Keys: ``calib_images`` (512 training images, class-balanced, for calibration), ``calib_labels``,
    ``calib_index`` (indices into the 60 000 training images), ``test_images`` (1 000 test images, 100 per class),
    ``test_labels``, ``test_index`` (indices into the 10 000 test images), ``seed``. Images are uint8
    [N, 28, 28], labels int64. Built by ``zoo/make_subset.py --seed 0``.
    """
    from importlib import resources

    ref = resources.files(__package__).joinpath("data", "fmnist_subset.npz")
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def preprocess(images, size: int = 32, channels: int = 3):
    """Turn uint8 Fashion-MNIST images into a normalized float32 model input, deterministically.

    ``images``: uint8 numpy array or torch tensor of shape [N, 28, 28] (or [28, 28] for one image).
    Returns a float32 ``torch.Tensor`` of shape [N, channels, size, size].

    Steps (fixed, no randomness):

    1. ``x = pixel / 255`` (float32).
    2. Zero-pad 2 pixels on every side to 32x32 (0 is the black background of Fashion-MNIST, so the pad is
       indistinguishable from background; this is the classic LeNet 28 -> 32 layout).
    3. If ``size != 32``: bilinear resize (antialiased when shrinking) of the 32x32 image to ``size x size``.
       (So ``size=64`` means the same picture at twice the resolution.)
    4. Normalize with the training-set statistics: ``(x - MEAN) / STD`` with MEAN = 0.2860406,
       STD = 0.3530242.
    5. Replicate the single grey channel to ``channels`` (default 3) identical channels. The zoo models are the
       stock torchvision architectures whose first conv takes 3 input channels; replicating the grey image
       (rather than replacing the first conv by a 1-channel one) keeps every module a standard torchvision
       module, which is what the quantization adapter expects.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8:
        raise TypeError(f"preprocess expects uint8 images, got {x.dtype}")
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or tuple(x.shape[1:]) != (28, 28):
        raise ValueError(f"expected images of shape [N, 28, 28], got {tuple(x.shape)}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    x = x.to(torch.float32).div_(255.0)[:, None]  # [N, 1, 28, 28]
    x = F.pad(x, (2, 2, 2, 2), value=0.0)  # [N, 1, 32, 32]
    if size != 32:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 32)
    x = (x - MEAN) / STD
    if channels != 1:
        x = x.expand(-1, channels, -1, -1)
    return x.contiguous()
