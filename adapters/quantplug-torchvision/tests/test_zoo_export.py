"""Deployable exports of a zoo CNN: packed integers reload bit-identical, ONNX QDQ runs in onnxruntime close to PyTorch.

Uses the embedded Fashion-MNIST subset, so it needs no dataset package; slow (about a minute), run by CI.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from quantplug_torchvision.adapter import available_zoo_models

from quantplug.api import apply
from quantplug.builtins.exporters import load_packed
from quantplug.plugins import Session

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif("resnet18-fmnist" not in available_zoo_models(), reason="zoo weights not committed"),
]
MODEL = "zoo:resnet18-fmnist"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.nn.Module, torch.Tensor]:
    out = str(tmp_path_factory.mktemp("zoo") / "run")
    session = Session()
    result = apply("nearest", MODEL, data="fmnist-subset", session=session, out_dir=out, eval_samples=256,
                   overrides={"weight.bits": 4, "activation.bits": 8, "calib.num_samples": 128})
    assert result.quant_metrics["top1"] > 80.0  # a working W4A8 model, not a broken export source
    test_set = session.data_source_for("fmnist-subset").load("fmnist-subset", "test", num_samples=64, seed=0)
    x = next(iter(torch.utils.data.DataLoader(test_set, batch_size=64)))[0]
    assert result.model is not None
    return out, result.model.eval(), x


def test_int_export_reloads_bit_identical_and_is_a_fraction_of_the_float_size(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir, model, x = run
    session = Session()
    info = session.exporters.get("int")().export(model, run_dir, str(tmp_path / "int"), session=session)
    packed = load_packed(str(tmp_path / "int"), session=session).eval()
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))
    weights = os.path.getsize(tmp_path / "int" / "model.packed.safetensors")
    float_bytes = sum(p.numel() * 4 for p in model.parameters())  # fp32 weights incl. what the run keeps
    # 4-bit body + 8-bit first / last layer: about an eighth of fp32 (the run keeps fp weights too, so < 1/4)
    assert weights < float_bytes / 4, info


def test_onnx_qdq_export_matches_pytorch_in_onnxruntime(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("quantplug_onnx", reason="pip install ./plugins/quantplug-onnx")
    from quantplug_onnx._export import run_onnxruntime

    run_dir, model, x = run
    session = Session()
    info = session.exporters.get("onnx")().export(model, run_dir, str(tmp_path / "onnx"), session=session)
    out = run_onnxruntime(str(tmp_path / "onnx" / "model.onnx"), (x,), exact=True)
    with torch.no_grad():
        ref = model(x).numpy()
    diff = np.abs(out - ref)
    # summation order differs between onnxruntime and PyTorch: an activation now and then lands one code step
    # away; a wrong scale, zero point or axis would be far larger and change predictions
    assert diff.max() < 0.5 and (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.95, info
