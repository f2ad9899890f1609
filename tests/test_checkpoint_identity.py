"""Reconstruction checkpoints record what the run was built from (model id, options, data, calibration set,
recipe, unit plan); --resume refuses a checkpoint of another run, and says so when there is nothing to resume."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from quantplug.api import apply
from quantplug.engine import CHECKPOINT_FILE
from quantplug.errors import ArtifactError
from quantplug.hookspecs import hookimpl
from quantplug.interfaces import DataSource
from quantplug.plugins import Session
from quantplug.testing.data import synthetic_images

TINY: dict[str, Any] = {"calib.num_samples": 16, "calib.batch_size": 16, "recon.iters": 2}
MODEL = "testing:tiny-resnet"


class ShiftedImages(DataSource):
    """``shifted:K``: the synthetic test images plus K (another data set of the same shape)."""

    name = "shifted"
    prefixes = ("shifted",)

    def load(self, spec: str, split: str, *, num_samples: int | None, seed: int) -> torch.utils.data.Dataset:
        data = synthetic_images(num_samples or 64, split, seed)
        x, y = data.tensors
        return torch.utils.data.TensorDataset(x + float(spec.partition(":")[2]), y)


class ShiftedPlugin:
    @hookimpl
    def register_data_sources(self, register):  # type: ignore[no-untyped-def]
        register(ShiftedImages)


@pytest.fixture
def session(session: Session) -> Session:
    """The shared test session's plugins (the ``soft-offset`` recipe) plus the ``shifted`` data source."""
    tests_plugins = [p for p in session.pm.get_plugins() if not getattr(p, "__name__", "").startswith("quantplug.")]
    return Session(entry_points=False, plugins=[*tests_plugins, ShiftedPlugin()])


class InterruptAfterFirstUnit:
    @hookimpl
    def on_unit_end(self, run, unit, record):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt


def _interrupted_run(session: Any, out: Path, **kwargs: Any) -> KeyboardInterrupt:
    stopper = InterruptAfterFirstUnit()
    session.pm.register(stopper)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            apply("soft-offset", MODEL, session=session, out_dir=str(out), eval_samples=16, **kwargs)
    finally:
        session.pm.unregister(stopper)
    return info.value


def _checkpoint(out: Path) -> Path:
    return Path(f"{out}.checkpoint") / CHECKPOINT_FILE


def test_checkpoint_records_the_runs_identity(session, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r"
    _interrupted_run(session, out, data="synthetic:images", overrides=TINY)
    identity = torch.load(_checkpoint(out), weights_only=False)["identity"]
    assert identity["model_id"] == MODEL and identity["data"] == "synthetic:images"
    assert identity["model_options"] == {} and identity["calib_samples"] == 16 and identity["calib_seed"] == 0
    assert identity["recipe"]["calib"]["num_samples"] == 16 and len(identity["plan"]) > 1


@pytest.mark.parametrize(("change", "field"), [
    ({"data": "shifted:1"}, "data"),
    ({"model_options": {"weights": "OTHER"}}, "model_options"),
    ({"overrides": {**TINY, "calib.num_samples": 32}}, "calib_samples"),
    ({"overrides": {**TINY, "calib.seed": 3}}, "calib_seed"),
])
def test_resume_with_other_inputs_is_refused(session, tmp_path, change, field) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r"
    first: dict[str, Any] = {"data": "shifted:0", "overrides": TINY}
    _interrupted_run(session, out, **first)
    saved = _checkpoint(out).read_bytes()
    with pytest.raises(ArtifactError, match=rf"other settings \(.*{field}.*drop --resume"):
        apply("soft-offset", MODEL, session=session, out_dir=str(out), eval_samples=16, resume=True,
              **{**first, **change})
    assert _checkpoint(out).read_bytes() == saved and not out.exists()  # nothing was mixed or overwritten


def test_resume_when_the_same_spec_holds_other_data_is_refused(session, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A folder whose images were replaced keeps its spec: the calibration fingerprint tells the runs apart."""
    out = tmp_path / "r"
    _interrupted_run(session, out, data="shifted:0", overrides=TINY)
    identity = torch.load(_checkpoint(out), weights_only=False)["identity"]
    assert len(identity["calib_fingerprint"]) == 64
    load = ShiftedImages.load

    def edited(self, spec, split, *, num_samples, seed):  # type: ignore[no-untyped-def]
        data = load(self, spec, split, num_samples=num_samples, seed=seed)
        x, y = data.tensors
        x[0, 0, 0, 0] += 1e-3  # one pixel of one image
        return torch.utils.data.TensorDataset(x, y)

    monkeypatch.setattr(ShiftedImages, "load", edited)
    with pytest.raises(ArtifactError, match="calibration data differs .* drop --resume"):
        apply("soft-offset", MODEL, session=session, out_dir=str(out), data="shifted:0", overrides=TINY,
              eval_samples=16, resume=True)


def test_identity_without_a_fingerprint_resumes_with_a_warning(session, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r"
    _interrupted_run(session, out, overrides=TINY)
    data = torch.load(_checkpoint(out), weights_only=False)
    del data["identity"]["calib_fingerprint"]  # written by version 2
    torch.save(data, _checkpoint(out))
    with caplog.at_level(logging.INFO, logger="quantplug"):
        apply("soft-offset", MODEL, session=session, out_dir=str(out), overrides=TINY, eval_samples=16, resume=True)
    assert "does not record calib_fingerprint" in caplog.text and "resuming after unit 1" in caplog.text


def test_resume_with_the_same_inputs_continues(session, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r"
    _interrupted_run(session, out, data="synthetic:images", overrides=TINY)
    with caplog.at_level(logging.INFO, logger="quantplug"):
        result = apply("soft-offset", MODEL, session=session, out_dir=str(out), data="synthetic:images",
                       overrides=TINY, eval_samples=16, resume=True)
    assert "resuming after unit 1" in caplog.text
    assert len(result.records) == len(result.plan) and not _checkpoint(out).parent.exists()


def test_old_checkpoint_without_identity_loads_with_a_warning(session, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r"
    _interrupted_run(session, out, overrides=TINY)
    data = torch.load(_checkpoint(out), weights_only=False)
    del data["identity"], data["checkpoint_version"]  # the layout written before identities were recorded
    torch.save(data, _checkpoint(out))
    with caplog.at_level(logging.INFO, logger="quantplug"):
        apply("soft-offset", MODEL, session=session, out_dir=str(out), overrides=TINY, eval_samples=16, resume=True)
    assert "does not record its model and data" in caplog.text and "resuming after unit 1" in caplog.text
    _interrupted_run(session, out, overrides=TINY)
    data = torch.load(_checkpoint(out), weights_only=False)
    del data["identity"]
    torch.save(data, _checkpoint(out))
    with pytest.raises(ArtifactError, match="recipe differs at recipe.weight.bits"):
        apply("soft-offset", MODEL, session=session, out_dir=str(out), overrides={**TINY, "weight.bits": 3},
              eval_samples=16, resume=True)


def test_resume_without_output_or_checkpoint_says_so(session, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="quantplug"):
        apply("nearest", MODEL, session=session, overrides=TINY, eval_samples=16, resume=True)
    assert any(r.levelno == logging.WARNING and "--resume has no effect without an output directory" in r.message
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="quantplug"):
        apply("nearest", MODEL, session=session, out_dir=str(tmp_path / "r"), overrides=TINY, eval_samples=16,
              resume=True)
    assert "--resume: no checkpoint at" in caplog.text and "starting from the first unit" in caplog.text


def test_interrupt_note_depends_on_the_checkpoint(session, tmp_path) -> None:  # type: ignore[no-untyped-def]
    exc = _interrupted_run(session, tmp_path / "r", overrides=TINY)
    assert "--resume continues" in exc.__notes__[-1] and str(tmp_path / "r.checkpoint") in exc.__notes__[-1]
    stopper = InterruptAfterFirstUnit()
    session.pm.register(stopper)
    with pytest.raises(KeyboardInterrupt) as info:
        apply("soft-offset", MODEL, session=session, overrides=TINY, eval_samples=16)  # like --no-save
    assert "--resume" not in info.value.__notes__[-1] and "must start over" in info.value.__notes__[-1]
