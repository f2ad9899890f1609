"""--out safety: only an earlier quantplug output (or a new / empty directory) may be replaced, checked before any
work; saved runs get the modes of the user's umask, not mkdtemp's 0700 / mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

import quantplug.api as api
from quantplug.api import apply
from quantplug.errors import ConfigError
from quantplug.export import MANIFEST, atomic_directory, atomic_write_text, check_output_dir, read_manifest

TINY: dict[str, Any] = {"calib.num_samples": 16, "calib.batch_size": 16, "recon.iters": 2}


def _never_build(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the model was loaded before --out was checked")


def _refused(session: Any, out: Path, monkeypatch: pytest.MonkeyPatch, match: str) -> None:
    """``apply`` refuses ``out`` before loading the model and leaves no checkpoint behind."""
    monkeypatch.setattr(api, "build_quant_model", _never_build)
    with pytest.raises(ConfigError, match=match):
        apply("nearest", "testing:tiny-resnet", session=session, out_dir=str(out), overrides=TINY, eval_samples=16)
    assert not Path(f"{os.path.abspath(out)}.checkpoint").exists()


def test_non_quantplug_directory_is_refused_before_any_work(session, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('precious')\n")
    _refused(session, project, monkeypatch, "not a quantplug output.*choose another --out")
    assert (project / "src" / "main.py").read_text() == "print('precious')\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no .old, no temporary, no checkpoint


@pytest.mark.parametrize("manifest", ['{"name": "my-app", "version": "1.0"}', "not json", "[]",
                                      '{"format_version": 1, "model_id": "m", "recipe": {}}'])
def test_directory_with_a_foreign_quantplug_json_is_refused(session, tmp_path, monkeypatch, manifest) -> None:  # type: ignore[no-untyped-def]
    """A file merely named ``quantplug.json`` (another tool's, or not a complete manifest) does not make a
    directory a quantplug output that ``--out`` may delete."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "quantplug.json").write_text(manifest)
    (project / "notes.txt").write_text("precious\n")
    _refused(session, project, monkeypatch, "not a quantplug output.*valid quantplug.json.*choose another --out")
    assert (project / "notes.txt").read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_plain_file_is_refused_and_left_alone(session, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me\n")
    _refused(session, afile, monkeypatch, "is a file.*choose another --out or remove")
    assert afile.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


def test_working_directory_and_its_parents_are_refused(session, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "proj" / "sub"
    work.mkdir(parents=True)
    (work / MANIFEST).write_text("{}")  # even a directory that looks like a run: it is where the user works
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path)):
        _refused(session, Path(out), monkeypatch, "current directory or one of its parents")
    assert (work / MANIFEST).exists()


def test_parent_that_is_a_file_or_not_writable_is_refused(session, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "afile").write_text("x")
    _refused(session, tmp_path / "afile" / "run", monkeypatch, "is a file, so the output directory cannot be created")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path) and real_access(path, mode))
    _refused(session, tmp_path / "run", monkeypatch, "cannot write to")


def test_missing_parents_are_created_and_empty_directory_is_used(session, tmp_path) -> None:  # type: ignore[no-untyped-def]
    nested = tmp_path / "runs" / "deep" / "r"
    assert check_output_dir(nested) == str(nested)
    empty = tmp_path / "empty"
    empty.mkdir()
    apply("nearest", "testing:tiny-resnet", session=session, out_dir=str(empty), overrides=TINY, eval_samples=16)
    assert read_manifest(str(empty))["model_id"] == "testing:tiny-resnet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no checkpoint or temporary left


def test_earlier_run_is_replaced_whole(session, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r"
    apply("nearest", "testing:tiny-resnet", session=session, out_dir=str(out), overrides=TINY, eval_samples=16)
    (out / "losses.png").write_bytes(b"stale")  # e.g. a report written into the run
    apply("nearest", "testing:tiny-resnet", session=session, out_dir=str(out),
          overrides={**TINY, "weight.bits": 3}, eval_samples=16)
    assert read_manifest(str(out))["recipe"]["weight"]["bits"] == 3
    assert not (out / "losses.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no backup or temporary left behind


def test_writer_rechecks_before_replacing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Something that is not a run appeared at --out while the run worked: the writer refuses to replace it."""
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="not a quantplug output"), atomic_directory(out) as tmp:
        Path(tmp, MANIFEST).write_text("{}")
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_files_get_the_umask_modes(tmp_path, mask) -> None:  # type: ignore[no-untyped-def]
    from torch import nn

    from quantplug.export import WEIGHTS, save_run

    old = os.umask(mask)
    try:
        run = tmp_path / "run"
        save_run(nn.Linear(2, 2), {"model_id": "test", "data": "synthetic:images"}, str(run))
        table = tmp_path / "table.md"
        atomic_write_text(table, "x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(run.stat().st_mode) == 0o777 & ~mask
    for name in (WEIGHTS, MANIFEST):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(table.stat().st_mode) == 0o666 & ~mask
