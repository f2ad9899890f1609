"""The built-in ``int`` exporter: packing, identical reloads, size, corrupt exports, ``quantplug export``."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantplug.export as export_module
from quantplug.api import apply
from quantplug.builtins import exporters
from quantplug.builtins.exporters import (
    PACKED_WEIGHTS,
    IntExporter,
    load_packed,
    pack_codes,
    packed_nbytes,
    split_aliases,
    unpack_codes,
)
from quantplug.cli import main
from quantplug.errors import ArtifactError, ConfigError
from quantplug.export import MANIFEST, load
from quantplug.plugins import Session
from quantplug.testing.data import synthetic_images, synthetic_tokens

FAST = {"calib.num_samples": 64, "calib.batch_size": 32}


def _session() -> Session:
    return Session(entry_points=False, plugins=[exporters])


def _inputs(model_id: str) -> torch.Tensor:
    if "resnet" in model_id:
        return synthetic_images(32, "test", 7).tensors[0]
    return synthetic_tokens(32, "test", 7).tensors[0]


def _float_state_bytes(model_id: str, path: Path) -> int:
    session = _session()
    adapter = session.adapter_for(model_id)
    model = adapter.fold_batchnorm(adapter.load(model_id, device=torch.device("cpu")).eval())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


# --------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1000, 4099])
def test_pack_unpack_round_trip(bits: int, signed: bool, numel: int) -> None:
    qmin = -(2 ** (bits - 1)) if signed else 0
    g = torch.Generator().manual_seed(bits * 100 + numel)
    codes = torch.randint(qmin, qmin + 2**bits, (numel,), generator=g, dtype=torch.int16)
    packed = pack_codes(codes, bits, qmin)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits) == (numel * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, numel, qmin, torch.int16), codes)


def test_pack_layout_is_a_dense_lsb_first_bit_stream() -> None:
    # 4 bits: first code in the low nibble
    assert pack_codes(torch.tensor([1, 2, 15, 0]), 4).tolist() == [0x21, 0x0F]
    # 2 bits: four codes per byte, first in the lowest bits
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    # 3 bits: eight codes in three bytes
    codes = torch.arange(8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack_codes(codes, 3).tolist() == [stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]
    # signed codes are stored as code - qmin
    assert pack_codes(torch.tensor([-8, 7]), 4, qmin=-8).tolist() == [0xF0]
    assert pack_codes(torch.tensor([-128, 127, 0]), 8, qmin=-128).tolist() == [0, 255, 128]


def test_pack_rejects_codes_outside_the_grid_and_bad_widths() -> None:
    with pytest.raises(ConfigError, match="do not fit 3 bits"):
        pack_codes(torch.tensor([0, 8]), 3)
    with pytest.raises(ConfigError, match="do not fit 4 bits"):
        pack_codes(torch.tensor([-9]), 4, qmin=-8)
    with pytest.raises(ConfigError, match="1 to 8 bits"):
        pack_codes(torch.tensor([0]), 9)
    with pytest.raises(ArtifactError, match="bytes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 3, 8)


# --------------------------------------------------------------------------- export and reload
RUNS = [
    ("testing:tiny-resnet", 4, 8, "per_channel"),
    ("testing:tiny-resnet", 3, 4, "per_channel"),
    ("testing:tiny-decoder", 4, 8, "per_channel"),
    ("testing:tiny-decoder", 3, 4, "per_channel"),
    ("testing:tiny-decoder", 4, 8, "per_group"),
    ("testing:tiny-resnet", 2, 4, "per_tensor"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int, int, str], tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for model_id, w, a, gran in RUNS:
        overrides = {**FAST, "weight.bits": w, "activation.bits": a, "weight.granularity": gran}
        if gran == "per_group":
            overrides["weight.granularity.group_size"] = 8
        if gran == "per_tensor":
            overrides["weight.symmetric"] = True
        run_dir = root / f"{model_id.split(':')[1]}-w{w}a{a}-{gran}"
        result = apply("nearest", model_id, session=_session(), out_dir=str(run_dir), eval_samples=32,
                       overrides=overrides)
        out[(model_id, w, a, gran)] = (run_dir, result.model)
    return out


@pytest.mark.parametrize("key", RUNS, ids=lambda k: f"{k[0].split(':')[1]}-w{k[1]}a{k[2]}-{k[3]}")
def test_export_reloads_with_identical_outputs_and_is_smaller(runs, tmp_path, key) -> None:  # type: ignore[no-untyped-def]
    model_id, w_bits, _, _ = key
    run_dir, model = runs[key]
    session = _session()
    out = tmp_path / "int"
    info = session.exporters.get("int")().export(model, run_dir, out)
    assert info["format"] == "int" and info["packed_layers"] > 0 and (out / PACKED_WEIGHTS).is_file()
    assert info["packed_weight_bytes"] * 32 <= info["float_weight_bytes"] * 8 + 8 * info["packed_layers"]
    manifest = json.loads((out / MANIFEST).read_text())
    source = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["export"]["format"] == "int" and manifest["recipe"] == source["recipe"]
    layers = manifest["packing"]["layers"]
    assert {v["bits"] for v in layers.values()} == {w_bits, 8}  # first / last layers stay at 8 bits
    for entry in layers.values():
        assert entry["nbytes"] == packed_nbytes(entry["numel"], entry["bits"])
    stored = load_file(str(out / PACKED_WEIGHTS))
    assert not any(k.endswith(".weight_codes") for k in stored)
    assert all(f"{name}.weight" not in stored for name in layers)

    reloaded = load_packed(out, session=session)
    x = _inputs(model_id)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
        assert torch.equal(reloaded(x), load(str(run_dir), session=session)(x))

    float_bytes = _float_state_bytes(model_id, tmp_path / "float.safetensors")
    packed_bytes = (out / PACKED_WEIGHTS).stat().st_size
    assert packed_bytes < float_bytes
    assert packed_bytes < (run_dir / "model.safetensors").stat().st_size


def test_export_without_a_model_loads_the_run(runs, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = runs[("testing:tiny-resnet", 4, 8, "per_channel")]
    # IntExporter().export(None, ...) loads the run itself through a default session (built-ins only here)
    monkeypatch.setenv("QUANTPLUG_LOAD_PLUGINS", "")
    IntExporter().export(None, run_dir, tmp_path / "int")
    x = _inputs("testing:tiny-resnet")
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "int", session=_session())(x), model(x))


@pytest.mark.skipif("load_packed" not in inspect.getsource(export_module),
                    reason="quantplug.export.load does not dispatch to load_packed yet")
def test_quantplug_load_reads_packed_exports(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = runs[("testing:tiny-decoder", 3, 4, "per_channel")]
    IntExporter().export(model, run_dir, tmp_path / "int")
    x = _inputs("testing:tiny-decoder")
    with torch.no_grad():
        assert torch.equal(load(str(tmp_path / "int"), session=_session())(x), model(x))


# --------------------------------------------------------------------------- corrupt / partial
def _export(runs, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    run_dir, model = runs[("testing:tiny-resnet", 4, 8, "per_channel")]
    out = tmp_path / "int"
    IntExporter().export(model, run_dir, out)
    return out


def test_corrupt_or_partial_exports_give_clear_errors(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    session = _session()
    with pytest.raises(ArtifactError, match="not a directory"):
        load_packed(tmp_path / "missing", session=session)

    out = _export(runs, tmp_path)
    weights = out / PACKED_WEIGHTS
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ArtifactError, match="corrupt"):
        load_packed(out, session=session)
    weights.write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_packed(out, session=session)
    weights.unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        load_packed(out, session=session)

    weights.write_bytes(good)
    manifest = json.loads((out / MANIFEST).read_text())
    no_packing = {k: v for k, v in manifest.items() if k != "packing"}
    (out / MANIFEST).write_text(json.dumps(no_packing))
    with pytest.raises(ArtifactError, match="not a packed-integer export"):
        load_packed(out, session=session)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_packed(out, session=session)
    (out / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="no quantplug.json"):
        load_packed(out, session=session)


def test_inconsistent_packed_tensors_are_reported(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    session = _session()
    out = _export(runs, tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["packing"].pop("sha256")  # simulate an export edited by hand: tensors checked one by one
    state = load_file(str(out / PACKED_WEIGHTS))
    key = manifest["packing"]["layers"]["layer1.0.conv1"]["key"]

    state[key] = state[key][:-1].clone()  # one byte short
    save_file(state, str(out / PACKED_WEIGHTS))
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="packed codes of 'layer1.0.conv1' are corrupt"):
        load_packed(out, session=session)

    del state[key]
    save_file(state, str(out / PACKED_WEIGHTS))
    with pytest.raises(ArtifactError, match="lacks 'layer1.0.conv1.weight_packed'"):
        load_packed(out, session=session)

    manifest["packing"]["layers"]["layer1.0.conv1"].pop("bits")
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="incomplete"):
        load_packed(out, session=session)


def test_manifest_naming_a_missing_file_or_wrong_bits_is_reported(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    session = _session()
    out = _export(runs, tmp_path)
    good = json.loads((out / MANIFEST).read_text())

    manifest = json.loads(json.dumps(good))
    manifest["packing"]["file"] = "model.other.safetensors"  # points at a file the directory does not have
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="has no model.other.safetensors; the export directory is incomplete"):
        load_packed(out, session=session)

    manifest = json.loads(json.dumps(good))
    entry = manifest["packing"]["layers"]["layer1.0.conv1"]
    assert entry["bits"] == 4
    entry["bits"] = 3  # the packed bytes no longer match the width
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="packed codes of 'layer1.0.conv1' are corrupt"):
        load_packed(out, session=session)
    entry["bits"] = 9
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="packed codes of 'layer1.0.conv1' are corrupt.*1 to 8 bits"):
        load_packed(out, session=session)

    manifest = json.loads(json.dumps(good))
    bits = next(b for b in manifest["bit_map"] if b["name"] == "layer1.0.conv1")
    bits["weight_bits"] = 3  # the codes are 4-bit, the model rebuilt from the manifest would be 3-bit
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="'layer1.0.conv1' is packed at 4 bits .* give it 3-bit weights"):
        load_packed(out, session=session)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: m["packing"].__setitem__("version", "3"), r"packing.version is '3', not a whole number"),
    (lambda m: m["packing"].__setitem__("version", True), r"packing.version is True"),
    (lambda m: m["packing"]["layers"]["layer1.0.conv1"].__setitem__("shape", [1, 2]),
     r"packing entry of layer 'layer1.0.conv1' is incomplete or corrupt \(shape \[1, 2\] does not hold"),
    (lambda m: m["packing"]["layers"]["layer1.0.conv1"].__setitem__("kind", "codebook"),
     r"says layer .layer1.0.conv1. is a lookup-table \(codebook\) layer, but .* has no .layer1.0.conv1.weight_codeb"),
    (lambda m: m["packing"]["layers"]["layer1.0.conv1"].__setitem__("kind", "lut"),
     "kind 'lut' is neither 'affine'"),
])
def test_hand_edited_packing_entries_are_reported(runs, tmp_path, edit, match) -> None:  # type: ignore[no-untyped-def]
    out = _export(runs, tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=match):
        load_packed(out, session=_session())


def test_packed_reload_uses_the_runs_bit_map(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a bit-allocation pass records per-layer widths the recipe alone would not give: the bit map wins
    out = _export(runs, tmp_path)
    _, model = runs[("testing:tiny-resnet", 4, 8, "per_channel")]
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["recipe"]["weight"]["bits"] = 3
    (out / MANIFEST).write_text(json.dumps(manifest))
    x = _inputs("testing:tiny-resnet")
    with torch.no_grad():
        assert torch.equal(load_packed(out, session=_session())(x), model(x))


def test_tied_tensors_are_stored_once_and_restored_under_every_name() -> None:
    shared = torch.arange(6.0).reshape(2, 3)
    state = {"embed.weight": shared, "head.weight": shared, "head.bias": torch.zeros(2),
             "other": shared.clone(), "row": shared[0], "empty": torch.empty(0), "empty2": torch.empty(0)}
    kept, aliases = split_aliases(state)
    assert aliases == {"head.weight": "embed.weight"}  # a copy or a different view of the memory is kept apart
    assert set(kept) == set(state) - {"head.weight"}


def test_alias_of_a_missing_tensor_is_reported(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = _export(runs, tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["packing"]["aliases"] == {} and manifest["packing"]["version"] == 1
    manifest["packing"]["aliases"] = {"fc.weight": "nowhere.weight"}
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lacks 'nowhere.weight' .*tied 'fc.weight'.* incomplete"):
        load_packed(out, session=_session())
    manifest["packing"]["aliases"] = ["fc.weight"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="packing.aliases is not a mapping"):
        load_packed(out, session=_session())


def test_failed_export_leaves_nothing_and_keeps_the_old_export(runs, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = runs[("testing:tiny-resnet", 4, 8, "per_channel")]

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(exporters, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        IntExporter().export(model, run_dir, tmp_path / "int")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    out = _export(runs, tmp_path)
    before = (out / PACKED_WEIGHTS).read_bytes()
    monkeypatch.setattr(exporters, "save_file", boom)
    with pytest.raises(OSError):
        IntExporter().export(model, run_dir, out)
    assert (out / PACKED_WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int"]


def test_export_refuses_to_overwrite_its_run(runs) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = runs[("testing:tiny-resnet", 4, 8, "per_channel")]
    with pytest.raises(ConfigError, match="run directory itself"):
        IntExporter().export(model, run_dir, run_dir)


def test_export_refuses_its_run_through_a_link_inside_it_or_around_it(runs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    run_dir, model = runs[("testing:tiny-resnet", 4, 8, "per_channel")]
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(ConfigError, match="run directory itself"):
        IntExporter().export(model, link, run_dir)  # the link resolves to the --out
    with pytest.raises(ConfigError, match="run directory itself"):
        IntExporter().export(model, run_dir, run_dir / ".." / run_dir.name)
    with pytest.raises(ConfigError, match="inside the run directory"):
        IntExporter().export(model, run_dir, run_dir / "int")
    assert sorted(p.name for p in run_dir.iterdir()) == before
    outer = tmp_path / "outer"
    shutil.copytree(run_dir, outer)  # an earlier run, replaceable as --out, holding the run to export
    shutil.copytree(run_dir, outer / "inner")
    with pytest.raises(ConfigError, match="contains the run directory"):
        IntExporter().export(model, outer / "inner", outer)
    assert (outer / "inner" / MANIFEST).is_file()


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("quantplug.cli._session", _session)


def test_cli_export_int(runs, tmp_path, capsys, cli_session) -> None:  # type: ignore[no-untyped-def]
    run_dir, model = runs[("testing:tiny-decoder", 4, 8, "per_group")]
    out = tmp_path / "exported"
    code = main(["export", str(run_dir), "--format", "int", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "int export" in captured.out and PACKED_WEIGHTS in captured.out and "total" in captured.out
    x = _inputs("testing:tiny-decoder")
    with torch.no_grad():
        assert torch.equal(load_packed(out, session=_session())(x), model(x))
    code = main(["export", str(run_dir), "--format", "int", "--out", str(out), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert code == 0 and info["bytes"] == sum(info["files"].values())


def test_cli_export_errors(runs, tmp_path, capsys, cli_session) -> None:  # type: ignore[no-untyped-def]
    run_dir, _ = runs[("testing:tiny-resnet", 4, 8, "per_channel")]
    code = main(["export", str(run_dir), "--format", "itn", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown exporter 'itn'" in err and "Registered: int" in err and "Did you mean 'int'" in err
    code = main(["export", str(tmp_path / "missing"), "--format", "int"])
    assert code == 2 and "not a directory" in capsys.readouterr().err
    code = main(["export", str(run_dir), "--format", "int", "-o", "level=3", "--out", str(tmp_path / "y")])
    assert code == 2 and "has no option(s) ['level']" in capsys.readouterr().err
    code = main(["export", str(run_dir), "--format", "int", "--out", str(run_dir)])
    assert code == 2 and "run directory itself" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
