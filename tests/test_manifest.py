"""The run manifest: absolute paths for local files (a run evaluates from any directory), validated keys and
types, and the device check of ``load``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from quantplug.api import absolute_spec, apply
from quantplug.builtins.exporters import is_packed_export
from quantplug.errors import ArtifactError, ConfigError
from quantplug.export import load, read_manifest
from quantplug.testing.data import synthetic_images

TINY: dict[str, Any] = {"calib.num_samples": 16, "calib.batch_size": 16, "recon.iters": 2}


def test_absolute_spec_only_touches_paths(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seq.pt").write_bytes(b"")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "images").mkdir()  # a directory named like a synthetic data set: not what the spec means
    assert absolute_spec("local:seq.pt") == f"local:{tmp_path}/seq.pt"
    query = "?weights=X.Y&classes=3"
    assert absolute_spec(f"imagefolder:imgs{query}") == f"imagefolder:{tmp_path}/imgs{query}"
    for kept in ("synthetic:images", "testing:tiny-resnet", "hf:facebook/opt-125m", "local:/abs/seq.pt",
                 "tensors:missing.pt", "fmnist"):
        assert absolute_spec(kept) == kept


def test_run_with_relative_data_file_evaluates_from_elsewhere(session, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from quantplug.hookspecs import hookimpl
    from quantplug.interfaces import DataSource
    from quantplug.plugins import Session

    class TensorFile(DataSource):
        name = "tfile"
        prefixes = ("tfile",)

        def load(self, spec: str, split: str, *, num_samples: int | None, seed: int) -> torch.utils.data.Dataset:
            x, y = torch.load(spec.partition(":")[2], weights_only=True)[split]
            return torch.utils.data.TensorDataset(x[:num_samples], y[:num_samples])

    class Plugin:
        @hookimpl
        def register_data_sources(self, register):  # type: ignore[no-untyped-def]
            register(TensorFile)

    session = Session(entry_points=False, plugins=[Plugin()])
    project = tmp_path / "project"
    project.mkdir()
    torch.save({s: synthetic_images(32, s, 0).tensors for s in ("train", "test")}, project / "good.pt")
    monkeypatch.chdir(project)
    apply("nearest", "testing:tiny-resnet", data="tfile:good.pt", session=session, out_dir="run", overrides=TINY,
          eval_samples=16)
    manifest = read_manifest(str(project / "run"))
    assert manifest["data"] == f"tfile:{project}/good.pt"
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded data still resolves
    assert len(session.data_source_for(manifest["data"]).load(manifest["data"], "test", num_samples=16, seed=0)) == 16


def _manifest_with(tmp_path: Path, **changes: Any) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    manifest = {"format_version": 1, "model_id": "testing:tiny-resnet", "recipe": {}, "data": "synthetic:images",
                **changes}
    (run / "quantplug.json").write_text(json.dumps({k: v for k, v in manifest.items() if v is not ...}))
    return run


@pytest.mark.parametrize(("changes", "match"), [
    ({"data": ...}, "lacks 'data'"),
    ({"format_version": "2"}, r"'format_version' is '2' \(str\), not int"),
    ({"format_version": True}, r"'format_version' is True \(bool\), not int"),
    ({"format_version": 0}, "format_version 0"),
    ({"format_version": 99}, "upgrade quantplug"),
    ({"recipe": []}, r"'recipe' is \[\] \(list\), not dict"),
    ({"model_id": 3}, r"'model_id' is 3 \(int\), not str"),
    ({"bit_map": "all"}, "'bit_map' is 'all'.*not list or null"),
])
def test_bad_manifests_give_artifact_errors(tmp_path, changes, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ArtifactError, match=match):
        read_manifest(str(_manifest_with(tmp_path, **changes)))


def test_manifest_that_is_not_an_object(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = _manifest_with(tmp_path)
    (run / "quantplug.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a JSON object"):
        read_manifest(str(run))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_load_on_missing_cuda_is_a_config_error(session, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r"
    apply("nearest", "testing:tiny-resnet", session=session, out_dir=str(out), overrides=TINY, eval_samples=16)
    with pytest.raises(ConfigError, match="CUDA is not available; use --device cpu"):
        load(str(out), device="cuda", session=session)
    with pytest.raises(ConfigError, match="not a device name"):
        load(str(out), device="gpu", session=session)
    assert load(str(out), device=torch.device("cpu"), session=session) is not None


def test_manifest_that_is_not_utf8_is_an_artifact_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = _manifest_with(tmp_path)
    (run / "quantplug.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ArtifactError, match="is corrupt"):
        read_manifest(str(run))
    with pytest.raises(ArtifactError, match="is corrupt"):
        load(str(run))


def test_null_export_section_loads_as_a_run(session, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r"
    apply("nearest", "testing:tiny-resnet", session=session, out_dir=str(out), overrides=TINY, eval_samples=16)
    manifest = json.loads((out / "quantplug.json").read_text())
    manifest["export"] = None
    (out / "quantplug.json").write_text(json.dumps(manifest))
    x = synthetic_images(4, "test", 0).tensors[0]
    with torch.no_grad():
        assert torch.equal(load(str(out), session=session)(x), load(str(out), session=session)(x))
    assert not is_packed_export(out)
    manifest["export"] = {"format": None}  # same: no format is a run
    (out / "quantplug.json").write_text(json.dumps(manifest))
    assert load(str(out), session=session) is not None


@pytest.mark.parametrize("bit_map", [
    [{"junk": 1}],
    ["x"],
    [{"name": "stem.conv", "weight_bits": "4", "input_bits": 8}],
    [{"name": 3, "weight_bits": 4, "input_bits": 8}],
    [{"name": "stem.conv", "weight_bits": 4, "input_bits": True}],
])
def test_malformed_bit_map_entries_give_artifact_errors(tmp_path, bit_map) -> None:  # type: ignore[no-untyped-def]
    run = _manifest_with(tmp_path, bit_map=bit_map)
    read_manifest(str(run))  # the list itself is well typed
    with pytest.raises(ArtifactError, match="bit_map entry 0 .*re-run `quantplug apply`"):
        load(str(run))
