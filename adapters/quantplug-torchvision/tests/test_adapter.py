"""The torchvision adapter: block structure of every supported family, model ids, the generic path."""

from __future__ import annotations

import json
import os
import urllib.error

import pytest
import torch
from quantplug_torchvision.adapter import TorchvisionAdapter, available_zoo_models
from quantplug_torchvision.sources import FashionMNISTSource, TensorFileSource
from torch import nn

from quantplug.api import apply
from quantplug.cli import main
from quantplug.errors import DataError, ModelLoadError
from quantplug.plugins import Session
from quantplug.testing.conformance import AdapterConformance, SchedulerConformance  # noqa: F401

torch.set_num_threads(1)


class TestResNet18(AdapterConformance):
    component = TorchvisionAdapter
    model_id = "torchvision:resnet18"
    data = "fmnist-subset:32"


class TestResNet50(AdapterConformance):
    component = TorchvisionAdapter
    model_id = "torchvision:resnet50"
    data = "fmnist-subset:32"
    num_samples = 2


class TestMobileNetV2(AdapterConformance):
    component = TorchvisionAdapter
    model_id = "torchvision:mobilenet_v2"
    data = "fmnist-subset:32"


class TestRegNetX(AdapterConformance):
    component = TorchvisionAdapter
    model_id = "torchvision:regnet_x_400mf"
    data = "fmnist-subset:32"
    num_samples = 4


class TestMNASNet(AdapterConformance):
    component = TorchvisionAdapter
    model_id = "torchvision:mnasnet0_5"
    data = "fmnist-subset:32"
    num_samples = 4


def test_block_names_of_resnet18_and_mobilenetv2() -> None:
    adapter = TorchvisionAdapter()
    r18 = adapter.load("torchvision:resnet18", device=torch.device("cpu"))
    names = [b.name for b in adapter.blocks(r18)]
    assert names == ["stem"] + [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)] + ["head"]
    assert adapter.first_last_layers(r18) == ("conv1", "fc")
    mbv2 = adapter.load("torchvision:mobilenet_v2", device=torch.device("cpu"))
    blocks = adapter.blocks(mbv2)
    assert len(blocks) == 19 and blocks[-1].layers == ("features.18.0", "classifier.1")
    assert {b.stage for b in blocks[1:-1]} == {"c16", "c24", "c32", "c64", "c96", "c160", "c320"}


class SmallNet(nn.Module):
    """A user's own CNN, not a torchvision family: found through the generic path."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_custom_cnn_saved_with_torch_save_quantizes_through_the_generic_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    torch.save(SmallNet(), path)
    result = apply("nearest", f"local:{path}", data="fmnist-subset:32", session=Session(), eval_samples=64,
                   overrides={"calib.num_samples": 64, "weight.bits": 4, "activation.bits": 8},
                   out_dir=str(tmp_path / "run"), model_options={})
    assert [r.name for r in result.records] == ["features.0", "features.3", "fc"]
    assert set(result.quant_metrics) == {"top1", "top5"}
    from quantplug.export import load

    reloaded = load(str(tmp_path / "run"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


def test_state_dict_needs_arch(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import torchvision

    path = tmp_path / "sd.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    assert main(["apply", f"local:{path}", "--data", "fmnist-subset:32", "--dry-run"]) == 2
    assert "--arch" in capsys.readouterr().err
    assert main(["apply", f"local:{path}", "--arch", "resnet18", "--num-classes", "10", "--data",
                 "fmnist-subset:32", "--dry-run"]) == 0
    assert "units (10)" in capsys.readouterr().out


def test_missing_local_file_and_unknown_zoo_model() -> None:
    adapter = TorchvisionAdapter()
    with pytest.raises(ModelLoadError, match="does not exist"):
        adapter.load("local:/nonexistent.pt", device=torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="unknown zoo model"):
        adapter.load("zoo:vgg-fmnist", device=torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="no model"):
        adapter.load("torchvision:resnet1800", device=torch.device("cpu"))


def test_pretrained_weights_without_network_say_where_to_put_the_file(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def offline(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        TorchvisionAdapter().load("torchvision:resnet18", device=torch.device("cpu"), options={"weights": "DEFAULT"})
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path) in msg
    with pytest.raises(ModelLoadError, match="IMAGENET1K_V1"):
        TorchvisionAdapter().load("torchvision:resnet18", device=torch.device("cpu"), options={"weights": "V9"})


def test_fmnist_subset_and_tensor_file_sources(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = FashionMNISTSource()
    train = src.load("fmnist-subset:32", "train", num_samples=100, seed=0)
    test = src.load("fmnist-subset:40", "test", num_samples=None, seed=0)
    assert len(train) == 100 and len(test) == 1000
    assert test[0][0].shape == (3, 40, 40)
    again = src.load("fmnist-subset:32", "train", num_samples=100, seed=0)
    assert torch.equal(train[5][0], again[5][0])
    other = src.load("fmnist-subset:32", "train", num_samples=100, seed=1)
    assert not all(torch.equal(train[i][0], other[i][0]) for i in range(10))
    path = tmp_path / "data.pt"
    x = torch.randn(8, 3, 8, 8)
    torch.save({"train": (x, torch.zeros(8, dtype=torch.long)), "test": (x[:4], torch.zeros(4, dtype=torch.long))},
               path)
    assert len(TensorFileSource().load(f"tensors:{path}", "test", num_samples=None, seed=0)) == 4
    x[0, 0, 0, 0] = float("nan")
    torch.save((x, torch.zeros(8, dtype=torch.long)), path)
    with pytest.raises(DataError, match="NaN"):
        TensorFileSource().load(f"tensors:{path}", "train", num_samples=None, seed=0)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist missing")
def test_full_fashion_mnist_splits() -> None:
    src = FashionMNISTSource()
    assert len(src.load("fmnist", "test", num_samples=None, seed=0)) == 10_000
    assert len(src.load("fmnist", "train", num_samples=256, seed=0)) == 256


def test_zoo_metadata_is_consistent_when_weights_exist() -> None:
    from quantplug_torchvision.adapter import available_zoo_models, zoo_dir

    for name in available_zoo_models():
        arch = {"resnet18-fmnist": "resnet18", "mobilenetv2-fmnist": "mobilenet_v2"}.get(name)
        if arch is None:
            continue
        meta = json.loads((zoo_dir() / f"{arch}-fmnist.json").read_text())
        assert meta["arch"] == arch and meta["input_size"][0] == 3


def test_zoo_model_rejects_inputs_of_another_size_with_the_fix() -> None:
    """zoo:mobilenetv2-fmnist was trained at 48x48: 32x32 data would run and give chance accuracy."""
    if "mobilenetv2-fmnist" not in available_zoo_models():
        pytest.skip("zoo weights not committed")
    adapter = TorchvisionAdapter()
    model = adapter.load("zoo:mobilenetv2-fmnist", device=torch.device("cpu"))
    assert adapter.default_data("zoo:mobilenetv2-fmnist") == "fmnist-subset:48"
    with torch.no_grad():
        assert adapter.forward(model, torch.zeros(2, 3, 48, 48)).shape == (2, 10)
        with pytest.raises(DataError, match="fmnist:48"):
            adapter.forward(model, torch.zeros(2, 3, 32, 32))
