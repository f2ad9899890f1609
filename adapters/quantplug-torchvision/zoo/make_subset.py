#!/usr/bin/env python
"""Build the embedded Fashion-MNIST subset ``src/quantplug_torchvision/data/fmnist_subset.npz``.

* ``calib_images`` / ``calib_labels``: 512 *training* images for calibration, class-balanced (51 or 52 per class;
  the two classes that get 52 are drawn by the seeded generator), drawn without replacement with
  ``numpy.random.default_rng(seed)``.
* ``test_images`` / ``test_labels``: 1 000 *test* images, 100 per class, same generator.
* ``calib_index`` / ``test_index``: the indices into the original train / t10k files.

Images are uint8 [N, 28, 28], labels int64 [N]; within each part, samples are sorted by original index.
The file is an ordinary ``.npz`` (readable by ``numpy.load``) whose members are LZMA-compressed (~580 kB instead
of ~680 kB with ``numpy.savez_compressed``'s deflate).

    python zoo/make_subset.py --seed 0
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

try:
    from quantplug_torchvision.fashion_mnist import load_fashion_mnist
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from quantplug_torchvision.fashion_mnist import load_fashion_mnist

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/quantplug_torchvision/data/fmnist_subset.npz"


def balanced_indices(labels: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    classes = np.unique(labels)
    per, extra = divmod(total, len(classes))
    counts = np.full(len(classes), per)
    counts[rng.choice(len(classes), size=extra, replace=False)] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, counts)]
    return np.sort(np.concatenate(picks))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="build the embedded Fashion-MNIST calibration/evaluation subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    xtr, ytr = load_fashion_mnist("train", args.data_root)
    xte, yte = load_fashion_mnist("test", args.data_root)
    ci = balanced_indices(ytr, args.calib, rng)
    ti = balanced_indices(yte, args.test, rng)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=args.out.parent)
    os.close(fd)
    arrays = {
        "calib_images": xtr[ci], "calib_labels": ytr[ci], "calib_index": ci.astype(np.int64),
        "test_images": xte[ti], "test_labels": yte[ti], "test_index": ti.astype(np.int64),
        "seed": np.int64(args.seed),
    }
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.asarray(arr), allow_pickle=False)
            # fixed timestamp so the file is byte-for-byte reproducible
            zf.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(),
                        compress_type=zipfile.ZIP_LZMA)
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB): calib {np.bincount(ytr[ci]).tolist()}, "
          f"test {np.bincount(yte[ti]).tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
