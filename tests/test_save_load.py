"""Save, reload with identical outputs, evaluate; corrupt and partial run directories."""

from __future__ import annotations

import json

import pytest
import torch

from quantplug.api import apply
from quantplug.errors import ArtifactError
from quantplug.export import load, read_manifest
from quantplug.testing.data import synthetic_images


@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_nearest_saves_reloads_identically(session, fast, tmp_path, bits) -> None:  # type: ignore[no-untyped-def]
    w, a = bits
    out = tmp_path / f"w{w}a{a}"
    result = apply("nearest", "testing:tiny-resnet", session=session, out_dir=str(out), eval_samples=300,
                   overrides={**fast, "weight.bits": w, "activation.bits": a})
    manifest = read_manifest(str(out))
    assert manifest["recipe"]["weight"]["bits"] == w and manifest["providers"]["rounding:nearest"] == "quantplug"
    assert manifest["metrics"]["quant"] == result.quant_metrics
    assert len(manifest["units"]) == len(result.records)
    reloaded = load(str(out), session=session)
    x = synthetic_images(32, "test", 5).tensors[0]
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))
    fp, q = result.fp_metrics["top1"], result.quant_metrics["top1"]
    if w == 8:
        assert abs(fp - q) <= 1.0
    else:
        assert q <= fp


def test_two_bit_nearest_loses_accuracy(session, fast) -> None:  # type: ignore[no-untyped-def]
    result = apply("nearest", "testing:tiny-resnet", session=session, eval_samples=300,
                   overrides={**fast, "weight.bits": 2, "activation.bits": 2})
    assert result.quant_metrics["top1"] < result.fp_metrics["top1"] - 5


def test_weights_are_on_the_integer_grid(session, fast, tmp_path) -> None:  # type: ignore[no-untyped-def]
    apply("nearest", session=session, out_dir=str(tmp_path / "r"), overrides={**fast, "weight.bits": 3},
          eval_samples=50)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "r" / "model.safetensors"))
    codes = state["layer1.0.conv1.weight_codes"]
    assert codes.dtype in (torch.int8, torch.int16) and codes.min() >= 0 and codes.max() <= 7


def test_corrupt_or_partial_run_dirs_give_clear_errors(session, fast, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r"
    apply("nearest", session=session, out_dir=str(out), overrides=fast, eval_samples=50)
    with pytest.raises(ArtifactError, match="not a directory"):
        load(str(tmp_path / "missing"), session=session)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="corrupt"):
        load(str(out), session=session)
    (out / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="incomplete"):
        load(str(out), session=session)
    (out / "quantplug.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        read_manifest(str(out))
    (out / "quantplug.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ArtifactError, match="lacks"):
        read_manifest(str(out))


def test_failed_run_leaves_no_output(session, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import quantplug.export as export

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", boom)
    with pytest.raises(OSError):
        apply("nearest", session=session, out_dir=str(tmp_path / "r"), overrides={"calib.num_samples": 64},
              eval_samples=50)
    assert not (tmp_path / "r").exists()  # only the resumable checkpoint is left
    assert [p.name for p in tmp_path.iterdir()] == ["r.checkpoint"]


def test_tied_weights_are_saved_apart_and_load_back_tied_values(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Language models tie the output projection to the embedding; safetensors refuses shared storage."""
    from torch import nn

    from quantplug.export import read_state, save_run

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    save_run(model, {"model_id": "test"}, str(tmp_path / "run"))
    state = read_state(str(tmp_path / "run"))
    assert torch.equal(state["embed.weight"], model.embed.weight)
    assert torch.equal(state["head.weight"], state["embed.weight"])
    fresh = Tied()
    fresh.load_state_dict(state)
    assert fresh.head.weight is fresh.embed.weight and torch.equal(fresh.embed.weight, model.embed.weight)


def test_atomic_write_text_replaces_whole_or_not_at_all(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from quantplug.export import atomic_write_text

    target = tmp_path / "deep" / "table.md"
    atomic_write_text(target, "first\n")
    atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"
    with pytest.raises(TypeError):
        atomic_write_text(target, 3)  # type: ignore[arg-type]  # fails mid-write
    assert target.read_text() == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.md"]  # no temporary left behind
