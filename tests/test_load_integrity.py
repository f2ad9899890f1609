"""``load`` refuses damaged weights: the recorded SHA-256 of ``model.safetensors`` and, per quantized layer, the
hardened codes / lookup-table indices (present, integer dtype as saved, the weight's shape, on the grid) and the
scales (finite, positive, one per row of the granularity). Each edit here loaded silently before."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantplug.api import apply
from quantplug.builtins.exporters import PACKED_WEIGHTS, IntExporter
from quantplug.errors import ArtifactError
from quantplug.export import MANIFEST, WEIGHTS, load, read_manifest, save_run
from quantplug.integrity import sha256_file
from quantplug.modules import QuantLayer
from quantplug.testing.data import synthetic_images

OVERRIDES = {"calib.num_samples": 64, "calib.batch_size": 32, "weight.bits": 4, "activation.bits": 8}
LAYER = "layer1.0.conv1"  # a 4-bit per-channel layer: codes in [0, 15]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    from quantplug.plugins import Session

    out = tmp_path_factory.mktemp("integrity") / "run"
    result = apply("nearest", "testing:tiny-resnet", session=Session(entry_points=False), out_dir=str(out),
                   overrides=OVERRIDES, eval_samples=32, evaluate_fp=False)
    return out, result.model


def _copy(run_dir: Path, tmp_path: Path, *, drop_sha: bool = True) -> Path:
    """A copy of the run; without its recorded hash, so the per-layer checks (not the hash) must catch edits."""
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    if drop_sha:
        manifest = json.loads((out / MANIFEST).read_text())
        manifest["weights"].pop("sha256")
        (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def _edit_state(run_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(str(run_dir / WEIGHTS))
    edit(state)
    save_file(state, str(run_dir / WEIGHTS), metadata={"format": "quantplug", "version": "1"})


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[key] = value(state[key])
    return edit


def _x() -> torch.Tensor:
    return synthetic_images(16, "test", 5).tensors[0]


def test_saved_run_records_hash_and_hardened_layers(run) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = run
    weights = read_manifest(str(run_dir))["weights"]
    assert weights["sha256"] == sha256_file(str(run_dir / WEIGHTS))
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QuantLayer) and m.quantizes_weight)
    assert sorted(weights["hardened"]) == quantized and LAYER in quantized
    assert weights["hardened"][LAYER] == {"kind": "codes", "dtype": "int8"}
    with torch.no_grad():
        assert torch.equal(load(str(run_dir))(_x()), model(_x()))


DAMAGE: list[tuple[str, Callable[[dict[str, torch.Tensor]], None], str]] = [
    ("codes_deleted", lambda s: s.pop(f"{LAYER}.weight_codes"), r"lacks its integer codes \(weight_codes\)"),
    ("codes_float", _set(f"{LAYER}.weight_codes", lambda t: t.float() + 0.4), "of dtype float32, saved as int8"),
    ("codes_off_grid", _set(f"{LAYER}.weight_codes", lambda t: t * 0 + 16), r"outside its 4-bit grid \[0, 15\]"),
    ("codes_negative", _set(f"{LAYER}.weight_codes", lambda t: t * 0 - 1), r"codes in \[-1, -1\]"),
    ("codes_shape", _set(f"{LAYER}.weight_codes", lambda t: t[:1].clone()), r"codes of shape \(1, 8, 3, 3\)"),
    ("scale_nan", _set(f"{LAYER}.weight_quantizer.scale", lambda t: t * float("nan")), "NaN, inf, zero or negative"),
    ("scale_negative", _set(f"{LAYER}.weight_quantizer.scale", lambda t: -t), "NaN, inf, zero or negative"),
    ("scale_count", _set(f"{LAYER}.weight_quantizer.scale", lambda t: t[:1].clone()), r"needs one per row: \(8,\)"),
    ("quantizer_off", _set(f"{LAYER}.weight_quantizer.initialized", lambda t: torch.tensor(False)),
     "uninitialized weight quantizer"),
]


@pytest.mark.parametrize(("edit", "match"), [(e, m) for _, e, m in DAMAGE], ids=[n for n, _, _ in DAMAGE])
def test_damaged_layer_is_refused_naming_layer_and_file(run, tmp_path, edit, match) -> None:  # type: ignore[no-untyped-def]
    out = _copy(run[0], tmp_path)
    _edit_state(out, edit)
    pattern = rf"{out / WEIGHTS}: layer '{LAYER}' .*{match}.*restore it from a copy or re-run `quantplug apply`"
    with pytest.raises(ArtifactError, match=pattern):
        load(str(out))


def test_recorded_hash_catches_any_changed_byte(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = _copy(run[0], tmp_path, drop_sha=False)
    data = bytearray((out / WEIGHTS).read_bytes())
    data[-10] ^= 0xFF  # a float weight: the model still loads and runs, with other outputs
    (out / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"SHA-256 does not match .*restore the file from a copy or re-run"):
        load(str(out))


def test_run_saved_before_the_record_loads_and_is_still_checked(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = run
    out = _copy(run_dir, tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["weights"]  # as written by earlier versions: no hash, no record of hardened layers
    (out / MANIFEST).write_text(json.dumps(manifest))
    with torch.no_grad():
        assert torch.equal(load(str(out))(_x()), model(_x()))
    _edit_state(out, _set(f"{LAYER}.weight_codes", lambda t: t * 0 + 16))
    with pytest.raises(ArtifactError, match=f"layer '{LAYER}' has codes in"):
        load(str(out))


def test_edited_granularity_is_refused_at_load(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = _copy(run[0], tmp_path, drop_sha=False)  # the weights file is intact: only the manifest changed
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["recipe"]["weight"]["granularity"] = {"kind": "per_tensor"}
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"per_tensor granularity needs one per row: \(1,\)"):
        load(str(out))


def test_malformed_weights_record_and_unknown_layers(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = _copy(run[0], tmp_path)
    good = json.loads((out / MANIFEST).read_text())
    bad: list[tuple[Any, str]] = [
        ({**good, "weights": {"sha256": 5}}, "'weights' is"),
        ({**good, "weights": {"hardened": ["x"]}}, "'weights' is"),
        ({**good, "weights": {"hardened": {"nope": {"kind": "codes"}}}}, r"records hardened weights for \['nope'\]"),
        ({**good, "weights": {"hardened": {LAYER: {"kind": "fp"}}}}, f"layer '{LAYER}' has the manifest record"),
        ({**good, "weights": {"hardened": {LAYER: {"kind": "codebook"}}}}, "lacks its lookup-table indices"),
    ]
    for manifest, match in bad:
        (out / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match=match):
            load(str(out))


def test_damaged_codebook_layer_is_refused(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir, _ = run
    model = load(str(run_dir))
    layer = model.get_submodule(LAYER)
    assert isinstance(layer, QuantLayer)
    codebook = torch.linspace(-0.5, 0.5, 16)
    layer.set_codebook(codebook, (layer.weight.detach() - codebook.view(-1, 1, 1, 1, 1)).abs().argmin(0))
    manifest = {k: v for k, v in read_manifest(str(run_dir)).items() if k != "format_version"}
    save_run(model, manifest, str(tmp_path / "cb"))
    assert read_manifest(str(tmp_path / "cb"))["weights"]["hardened"][LAYER] == {"kind": "codebook", "dtype": "uint8"}
    with torch.no_grad():
        assert torch.equal(load(str(tmp_path / "cb"))(_x()), model(_x()))
    cases: list[tuple[Callable[[dict[str, torch.Tensor]], None], str]] = [
        (lambda s: s.pop(f"{LAYER}.weight_indices"), "lacks its lookup-table indices"),
        (_set(f"{LAYER}.weight_indices", lambda t: t * 0 + 16), r"indices outside \[0, 15\]"),
        (_set(f"{LAYER}.weight_codebook", lambda t: t * float("nan")), "NaN or inf codebook entries"),
    ]
    for edit, match in cases:
        shutil.rmtree(tmp_path / "copy", ignore_errors=True)
        out = _copy(tmp_path / "cb", tmp_path)
        _edit_state(out, edit)
        with pytest.raises(ArtifactError, match=f"layer '{LAYER}' .*{match}"):
            load(str(out))


def test_packed_export_with_nan_scales_is_refused(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = run
    out = tmp_path / "int"
    IntExporter().export(model, run_dir, out)
    state = load_file(str(out / PACKED_WEIGHTS))
    state[f"{LAYER}.weight_quantizer.scale"] = state[f"{LAYER}.weight_quantizer.scale"] * float("nan")
    save_file(state, str(out / PACKED_WEIGHTS))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["packing"]["sha256"] = sha256_file(str(out / PACKED_WEIGHTS))  # edited consistently
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"{PACKED_WEIGHTS}: layer '{LAYER}' has NaN.*export --format int"):
        load(str(out))
