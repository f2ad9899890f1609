"""Tests for the Fashion-MNIST reader (synthetic IDX files; the real data set is optional)."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quantplug_torchvision import fashion_mnist as fm  # noqa: E402


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    payload = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _fake_dataset(d: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        _write_idx(d / f"{prefix}-images-idx3-ubyte", x, gz)
        _write_idx(d / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "DEBIAN_ROOT", str(tmp_path / "no-debian"))


@pytest.mark.parametrize("gz", [True, False])
def test_explicit_root_flat_and_torchvision_layout(tmp_path, no_system_data, gz):
    ref = _fake_dataset(tmp_path / "flat", gz=gz)
    x, y = fm.load_fashion_mnist("train", root=tmp_path / "flat")
    assert x.dtype == np.uint8 and x.shape == (20, 28, 28) and y.dtype == np.int64
    np.testing.assert_array_equal(x, ref["train"][0])
    np.testing.assert_array_equal(y, ref["train"][1])
    ref2 = _fake_dataset(tmp_path / "tv" / "FashionMNIST" / "raw", gz=gz, seed=1)
    x2, y2 = fm.load_fashion_mnist("test", root=tmp_path / "tv")
    np.testing.assert_array_equal(x2, ref2["test"][0])
    np.testing.assert_array_equal(y2, ref2["test"][1])


def test_lookup_order(tmp_path, monkeypatch, no_system_data):
    a = _fake_dataset(tmp_path / "a", seed=1)
    b = _fake_dataset(tmp_path / "b", seed=2)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "b"))
    np.testing.assert_array_equal(fm.load_fashion_mnist("train")[0], b["train"][0])
    np.testing.assert_array_equal(fm.load_fashion_mnist("train", root=tmp_path / "a")[0], a["train"][0])
    monkeypatch.delenv(fm.ENV_VAR)
    monkeypatch.setattr(fm, "DEBIAN_ROOT", str(tmp_path / "a"))
    np.testing.assert_array_equal(fm.load_fashion_mnist("train")[0], a["train"][0])


def test_not_found_message(no_system_data, tmp_path):
    with pytest.raises(fm.FashionMNISTNotFoundError) as ei:
        fm.load_fashion_mnist("train", root=tmp_path / "nothing")
    msg = str(ei.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "apt-get download dataset-fashion-mnist && dpkg-deb -x" in msg
    assert "QUANTPLUG_FASHION_MNIST" in msg and "pass a root" in msg


def test_bad_file(tmp_path, no_system_data):
    p = tmp_path / "x-ubyte"
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError):
        fm.read_idx(p)


@pytest.mark.parametrize("size", [28, 32, 48, 64])
def test_preprocess(size):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    a = fm.preprocess(x, size)
    b = fm.preprocess(torch.from_numpy(x), size)
    assert a.shape == (4, 3, size, size) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert torch.equal(a[:, 0], a[:, 1]) and torch.equal(a[:, 0], a[:, 2])
    if size == 32:
        assert torch.allclose(a[:, :, 0, 0], torch.tensor(-fm.MEAN / fm.STD))
        assert torch.allclose(a[:, 0, 2:30, 2:30], (torch.from_numpy(x).float() / 255 - fm.MEAN) / fm.STD)
    assert fm.preprocess(x[0], size).shape == (1, 3, size, size)


def test_embedded_subset():
    d = fm.load_subset()
    assert d["calib_images"].shape == (512, 28, 28) and d["calib_images"].dtype == np.uint8
    assert d["test_images"].shape == (1000, 28, 28) and d["test_labels"].dtype == np.int64
    assert np.bincount(d["test_labels"], minlength=10).tolist() == [100] * 10
    counts = np.bincount(d["calib_labels"], minlength=10)
    assert counts.sum() == 512 and counts.min() >= 51 and counts.max() <= 52


@pytest.mark.skipif(not Path(fm.DEBIAN_ROOT).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_data_matches_subset():
    x, y = fm.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
    d = fm.load_subset()
    np.testing.assert_array_equal(x[d["test_index"]], d["test_images"])
    np.testing.assert_array_equal(y[d["test_index"]], d["test_labels"])
