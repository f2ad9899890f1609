"""Model ids: hf: (offline cache), local directories, the zoo, and routing between adapters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from quantplug_transformers import hub
from quantplug_transformers.adapter import TransformersAdapter

from quantplug.errors import ModelLoadError
from quantplug.plugins import Session

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402


def test_hf_id_offline_and_not_cached_says_where_files_go(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ModelLoadError) as info:
        hub.resolve_model_dir("hf:facebook/opt-125m")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and str(tmp_path / "hub-cache") in message
    assert "huggingface-cli download facebook/opt-125m" in message and "local:DIR" in message


def test_hf_id_found_in_the_offline_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A model in huggingface_hub's cache layout loads offline through hf:ORG/NAME."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--opt" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_models.model_dir("opt"), snapshot)
    (cache / "models--tiny--opt" / "refs").mkdir()
    (cache / "models--tiny--opt" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    import huggingface_hub._snapshot_download as snap

    monkeypatch.setattr(snap, "HF_HUB_CACHE", str(cache), raising=False)
    assert hub.resolve_model_dir("hf:tiny/opt") == snapshot
    import torch

    model = TransformersAdapter().load("hf:tiny/opt", device=torch.device("cpu"))
    assert type(model).__name__ == "OPTForCausalLM"


def test_local_and_hf_directories() -> None:
    directory = tiny_models.model_dir("gptneo")
    assert hub.resolve_model_dir(f"local:{directory}") == directory
    assert hub.resolve_model_dir(f"hf:{directory}") == directory
    with pytest.raises(ModelLoadError, match="not a directory"):
        hub.resolve_model_dir("local:/no/such/dir")
    with pytest.raises(ModelLoadError, match="no config.json"):
        hub.resolve_model_dir(f"local:{directory.parent}")


def test_zoo_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="zoo:opt-austen"):
        hub.zoo_dir("gpt2-austen")
    monkeypatch.setenv(hub.ZOO_ENV, str(tmp_path))
    with pytest.raises(ModelLoadError, match="train_zoo.py --arch gptneo"):
        hub.zoo_dir("gptneo-austen")


def test_adapter_claims_hf_local_dirs_and_its_zoo_only() -> None:
    adapter = TransformersAdapter()
    assert adapter.can_load("hf:facebook/opt-125m") and adapter.can_load("zoo:opt-austen")
    assert adapter.can_load(tiny_models.model_id("opt"))
    assert not adapter.can_load("zoo:resnet18-fmnist") and not adapter.can_load("local:/x/model.pt")
    session = Session(entry_points=True)
    assert isinstance(session.adapter_for("zoo:gptneo-austen"), TransformersAdapter)
    assert isinstance(session.adapter_for(tiny_models.model_id("opt")), TransformersAdapter)
