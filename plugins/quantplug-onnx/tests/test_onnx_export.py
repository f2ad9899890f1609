"""quantplug-onnx: QDQ graphs for the tiny models, checked with onnxruntime against PyTorch fake quantization."""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# collected by the host's test run too: skip (not fail) where the plugin is not installed
onnx = pytest.importorskip("onnx", reason="quantplug-onnx is not installed (pip install ./plugins/quantplug-onnx)")
pytest.importorskip("onnxruntime", reason="quantplug-onnx is not installed (pip install ./plugins/quantplug-onnx)")
quantplug_onnx = pytest.importorskip("quantplug_onnx", reason="pip install ./plugins/quantplug-onnx")

from onnx import TensorProto, numpy_helper  # noqa: E402
from quantplug_onnx._export import OnnxExportError, run_onnxruntime  # noqa: E402

from quantplug.api import apply  # noqa: E402
from quantplug.builtins import exporters  # noqa: E402
from quantplug.cli import main  # noqa: E402
from quantplug.errors import ArtifactError, ConfigError  # noqa: E402
from quantplug.plugins import Session  # noqa: E402
from quantplug.testing.data import synthetic_images, synthetic_tokens  # noqa: E402

torch.set_num_threads(1)
FAST = {"calib.num_samples": 64, "calib.batch_size": 32}


def _session() -> Session:
    return Session(entry_points=False, plugins=[exporters, quantplug_onnx])


def _exporter(**options):  # type: ignore[no-untyped-def]
    cls = _session().exporters.get("onnx")
    return cls(cls.make_config(options))


def _inputs(model_id: str, n: int = 32) -> torch.Tensor:
    if "resnet" in model_id:
        return synthetic_images(n, "test", 11).tensors[0]
    return synthetic_tokens(n, "test", 11).tensors[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("runs")
    specs = {
        "resnet-w4a8": ("testing:tiny-resnet", {"weight.bits": 4, "activation.bits": 8}),
        "decoder-w3a4": ("testing:tiny-decoder", {"weight.bits": 3, "activation.bits": 4}),
        "decoder-w4a8-group": ("testing:tiny-decoder", {"weight.bits": 4, "activation.bits": 8,
                                                        "weight.granularity": "per_group",
                                                        "weight.granularity.group_size": 8}),
    }
    out = {}
    for key, (model_id, overrides) in specs.items():
        result = apply("nearest", model_id, session=_session(), out_dir=str(root / key), eval_samples=32,
                       overrides={**FAST, **overrides})
        out[key] = (root / key, result.model)
    return out


def _graph(path: Path) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    proto = onnx.load(str(path / "model.onnx"))
    return proto, {t.name: t for t in proto.graph.initializer}


def _compare(path: Path, model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
    """(max |onnxruntime - torch|, fraction of outputs differing by more than 1e-4, top-1 agreement)."""
    with torch.no_grad():
        ref = model(x).numpy()
    out = run_onnxruntime(str(path / "model.onnx"), (x,), exact=True)
    diff = np.abs(out - ref)
    print(f"{path}: max {diff.max():.3g}, differing {(diff > 1e-4).mean():.3f}, "
          f"top-1 agreement {(out.argmax(-1) == ref.argmax(-1)).mean():.4f}")
    return float(diff.max()), float((diff > 1e-4).mean()), float((out.argmax(-1) == ref.argmax(-1)).mean())


def _assert_close(path: Path, model: torch.nn.Module, x: torch.Tensor) -> None:
    # onnxruntime and PyTorch sum in different orders; now and then an activation lands on the other side of a
    # rounding boundary and that one code step propagates. PyTorch itself differs by the same order between
    # batch sizes (see README). Anything systematic (a wrong scale, zero point, axis) is far larger.
    max_diff, _, agreement = _compare(path, model, x)
    assert max_diff < 0.25 and agreement >= 0.95


def test_entry_point_is_declared() -> None:
    eps = {ep.name: ep.value for ep in md.entry_points(group="quantplug")}
    assert eps.get("onnx") == "quantplug_onnx"
    assert "onnx" in _session().exporters and _session().exporters.entry("onnx").provider == "quantplug_onnx"


def test_resnet_w4a8_via_cli(runs, tmp_path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = runs["resnet-w4a8"]
    monkeypatch.setattr("quantplug.cli._session", _session)
    out = tmp_path / "onnx"
    code = main(["export", str(run_dir), "--format", "onnx", "--out", str(out), "-o", "opset=21", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    info = json.loads(captured.out)
    assert info["opset"] == 21 and info["max_abs_diff"] < 0.25
    manifest = json.loads((out / "quantplug.json").read_text())
    assert manifest["export"]["format"] == "onnx" and manifest["model_id"] == "testing:tiny-resnet"

    proto, inits = _graph(out)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 8  # one per quantized layer input (8 conv / linear layers)
    dq_weights = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(dq_weights) == 9  # every conv / linear weight comes from integer codes
    types = {TensorProto.DataType.Name(inits[n.input[0]].data_type) for n in dq_weights}
    assert types == {"UINT4", "UINT8"}  # 4-bit body, 8-bit first and last layer
    for node in dq_weights:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("axis", 1) == 0 and numpy_helper.to_array(inits[node.input[1]]).ndim == 1  # per-channel
    act_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[2]].data_type == TensorProto.UINT8 for n in act_q)

    _assert_close(out, model, _inputs("testing:tiny-resnet", 32))  # dynamic batch: not the export batch size


def test_decoder_w3a4_int4_weights_and_narrow_activations(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = runs["decoder-w3a4"]
    out = tmp_path / "onnx"
    info = _exporter().export(model, run_dir, out, session=_session())
    assert info["max_abs_diff"] < 0.25 and info["int4_layers"] == 11
    assert info["weight_types"]["layers.0.fc1"] == "UINT4" and info["weight_types"]["head.proj"] == "UINT8"
    proto, inits = _graph(out)
    ops = [n.op_type for n in proto.graph.node]
    assert "Clip" in ops or "Min" in ops  # 4-bit activations clamp to their grid inside the uint8 container
    _assert_close(out, model, _inputs("testing:tiny-decoder", 32))
    assert (out / "model.onnx").stat().st_size < 200_000


def test_decoder_per_group_uses_block_size(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = runs["decoder-w4a8-group"]
    out = tmp_path / "onnx"
    _exporter().export(model, run_dir, out, session=_session())
    proto, inits = _graph(out)
    blocked = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 8 for a in n.attribute)]
    assert len(blocked) == 13  # all linear layers of the decoder
    for node in blocked:
        codes, scale = inits[node.input[0]], inits[node.input[1]]
        assert codes.dims[1] == 8 * scale.dims[1]
    _assert_close(out, model, _inputs("testing:tiny-decoder", 32))


def test_opset_18_with_int8_containers(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = runs["decoder-w3a4"]
    out = tmp_path / "onnx18"
    info = _exporter(opset=18, low_bit_container="int8").export(model, run_dir, out, session=_session())
    assert info["opset"] == 18 and set(info["weight_types"].values()) == {"UINT8"}
    _assert_close(out, model, _inputs("testing:tiny-decoder", 32))


def test_unsupported_opset_and_bit_width_errors(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = runs["decoder-w3a4"]
    with pytest.raises(OnnxExportError, match="3-bit weights: ONNX opset 18 has no INT4 / UINT4 type"):
        _exporter(opset=18).export(model, run_dir, tmp_path / "a", session=_session())
    group_dir, group_model = runs["decoder-w4a8-group"]
    with pytest.raises(OnnxExportError, match="block_size needs ONNX opset 21"):
        _exporter(opset=20, low_bit_container="int8").export(group_model, group_dir, tmp_path / "b",
                                                             session=_session())
    with pytest.raises(OnnxExportError, match="opset 12 is not supported"):
        _exporter(opset=12).export(model, run_dir, tmp_path / "c", session=_session())
    with pytest.raises(ConfigError, match="low_bit_container"):
        _exporter(low_bit_container="int2").export(model, run_dir, tmp_path / "d", session=_session())
    with pytest.raises(ConfigError, match="has no option"):
        _exporter(bits=4)
    assert not any(tmp_path.iterdir())


def test_codebook_layer_error_names_the_layer(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import copy

    from quantplug.modules import QuantLayer

    run_dir, model = runs["resnet-w4a8"]
    model = copy.deepcopy(model)
    layer = model.get_submodule("layer1.0.conv1")
    assert isinstance(layer, QuantLayer)
    codebook = torch.linspace(-0.5, 0.5, 16)
    layer.set_codebook(codebook, (layer.weight.detach() - codebook.view(-1, 1, 1, 1, 1)).abs().argmin(0))
    with pytest.raises(OnnxExportError, match="layer 'layer1.0.conv1' holds lookup-table .*--format int"):
        _exporter().export(model, run_dir, tmp_path / "cb", session=_session())
    assert not any(tmp_path.iterdir())


def test_unknown_format_lists_onnx(runs, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("quantplug.cli._session", _session)
    run_dir, _ = runs["resnet-w4a8"]
    code = main(["export", str(run_dir), "--format", "onxx"])
    err = capsys.readouterr().err
    assert code == 2 and "Registered: int, onnx" in err and "Did you mean 'onnx'" in err


# --------------------------------------------------------------------------- loading an export directory
@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """One ONNX export (3-bit weights as UINT4, 8-bit first / last layer), copied by the tests that edit it."""
    run_dir, model = runs["decoder-w3a4"]
    out = tmp_path_factory.mktemp("exported") / "onnx"
    info = _exporter(verify=False).export(model, run_dir, out, session=_session())
    assert info["file"] == "model.onnx" and len(info["sha256"]) == 64
    return out


def test_load_session_runs_an_intact_export(exported, runs) -> None:  # type: ignore[no-untyped-def]
    x = _inputs("testing:tiny-decoder", 16)
    session = quantplug_onnx.load_session(exported)
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.array_equal(logits, run_onnxruntime(str(exported / "model.onnx"), (x,), exact=True))
    with torch.no_grad():
        assert np.abs(logits - runs["decoder-w3a4"][1](x).numpy()).max() < 0.25


def test_corrupt_or_partial_onnx_exports_give_clear_errors(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "onnx"
    shutil.copytree(exported, out)
    graph, manifest_path = out / "model.onnx", out / "quantplug.json"
    good_graph, good_manifest = graph.read_bytes(), json.loads(manifest_path.read_text())

    def rewrite(change) -> None:  # type: ignore[no-untyped-def]
        manifest = json.loads(json.dumps(good_manifest))
        change(manifest["export"])
        manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(ArtifactError, match="not a directory"):
        quantplug_onnx.load_session(tmp_path / "missing")
    graph.write_bytes(good_graph[: len(good_graph) // 2])  # truncated
    with pytest.raises(ArtifactError, match=r"model.onnx is corrupt \(its SHA-256 does not match"):
        quantplug_onnx.load_session(out)
    rewrite(lambda e: e.pop("sha256"))  # a hand-edited manifest without the checksum: the parser catches it
    with pytest.raises(ArtifactError, match="model.onnx is corrupt|holds no graph|onnxruntime cannot load"):
        quantplug_onnx.load_session(out)
    graph.unlink()
    with pytest.raises(ArtifactError, match="has no model.onnx; the export directory is incomplete"):
        quantplug_onnx.load_session(out)

    graph.write_bytes(good_graph)
    rewrite(lambda e: e.update(file="model.v2.onnx"))  # names a file the directory does not have
    with pytest.raises(ArtifactError, match="has no model.v2.onnx; the export directory is incomplete"):
        quantplug_onnx.load_session(out)
    layer = next(name for name, kind in good_manifest["export"]["weight_types"].items() if kind == "UINT4")
    rewrite(lambda e: e["weight_types"].update({layer: "UINT8"}))  # wrong bits: 3-bit codes stored as UINT4
    with pytest.raises(ArtifactError, match=f"disagree on the weight codes of 1 layer.*'{layer}': manifest UINT8, "
                                            "graph UINT4"):
        quantplug_onnx.load_session(out)
    rewrite(lambda e: e.update(format="int"))
    with pytest.raises(ArtifactError, match="not an ONNX export"):
        quantplug_onnx.load_session(out)
    manifest_path.write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        quantplug_onnx.load_session(out)
    manifest_path.unlink()
    with pytest.raises(ArtifactError, match="no quantplug.json"):
        quantplug_onnx.load_session(out)
    manifest_path.write_text(json.dumps(good_manifest))
    assert quantplug_onnx.load_session(out) is not None  # restored: loads again
