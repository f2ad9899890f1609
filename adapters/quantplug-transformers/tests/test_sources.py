"""Text data: the embedded Austen corpus, text files, fixed-length windows with a seed, and errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from quantplug_transformers import corpus
from quantplug_transformers.sources import AustenSource, TextFileSource, load_tokenizer, parse_spec

from quantplug.errors import DataError
from quantplug.plugins import Session

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402


def test_embedded_austen_has_six_novels_and_holds_out_persuasion() -> None:
    novels = corpus.austen_novels("embedded")
    assert set(novels) == set(corpus.NOVELS)
    words = {k: len(v.split()) for k, v in novels.items()}
    assert 80_000 < words["persuasion"] < 90_000 and sum(words.values()) > 700_000
    train, test = corpus.austen_text("train", "embedded"), corpus.austen_text("test", "embedded")
    assert "Anne Elliot" in test and "Anne Elliot" not in train
    assert "Elizabeth Bennet" in train and "Elizabeth Bennet" not in test


def test_spec_parsing_and_unknown_options() -> None:
    assert parse_spec("text:/a/b.txt?tokenizer=zoo:x&length=64") == ("text", "/a/b.txt",
                                                                      {"tokenizer": "zoo:x", "length": "64"})
    with pytest.raises(DataError, match="unknown option"):
        parse_spec("austen?tokenizr=zoo:x")


def _austen(family: str, split: str, n: int | None, seed: int, length: int = 32) -> torch.Tensor:
    spec = f"austen?tokenizer={tiny_models.model_id(family)}&length={length}"
    return AustenSource().load(spec, split, num_samples=n, seed=seed).tensors[0]  # type: ignore[attr-defined]


def _text(split: str, n: int | None, seed: int, path: Path | None = None, extra: str = "") -> torch.Tensor:
    spec = f"text:{path or tiny_models.text_file()}?tokenizer={tiny_models.model_id('opt')}&length=32{extra}"
    return TextFileSource().load(spec, split, num_samples=n, seed=seed).tensors[0]  # type: ignore[attr-defined]


def test_calibration_windows_are_seeded_random_crops() -> None:
    a, b, c = _text("train", 16, 0), _text("train", 16, 0), _text("train", 16, 1)
    assert a.shape == (16, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = _text("train", None, 0).flatten().tolist()  # every crop is a piece of the text
    text = " ".join(map(str, stream))
    assert all(" ".join(map(str, row.tolist())) in text for row in a)


def test_evaluation_windows_are_consecutive_held_out_text() -> None:
    tok = load_tokenizer(tiny_models.model_id("opt"))
    windows = _austen("opt", "test", 3, seed=5)
    decoded = tok.decode(windows.flatten().tolist())
    assert corpus.austen_text("test").startswith(decoded) and len(decoded) > 100
    assert torch.equal(windows, _austen("opt", "test", 3, seed=9))  # the seed does not change evaluation
    assert _austen("opt", "test", None, 0).shape[0] > 1000  # all of Persuasion


def test_bert_windows_carry_cls_and_sep_and_reference_embeddings() -> None:
    spec = tiny_models.data_spec("bert", length=24)
    ds = TextFileSource().load(spec, "test", num_samples=4, seed=0)
    ids, ref = ds.tensors  # type: ignore[attr-defined]
    tok = load_tokenizer(tiny_models.model_id("bert"))
    assert ids.shape == (4, 24)
    assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
    assert ref.shape == (4, 32) and ref.is_floating_point()


def test_text_file_and_directory_split(tmp_path: Path) -> None:
    text = tiny_models.sample_text()
    (tmp_path / "b.txt").write_text(text[10_000:])
    (tmp_path / "a.txt").write_text(text[:10_000])
    tok = load_tokenizer(tiny_models.model_id("opt"))
    joined = text[:10_000] + "\n\n" + text[10_000:]  # files in name order, a blank line between
    train = _text("train", None, 0, tmp_path)
    test = _text("test", None, 0, tmp_path)
    assert joined.startswith(tok.decode(train.flatten().tolist()))
    assert tok.decode(test.flatten().tolist()) in joined[int(0.9 * len(joined)) - 1:]
    assert train.shape[0] > 5 * test.shape[0]  # 90 % / 10 %
    half = _text("test", None, 0, tmp_path, "&test_fraction=0.5")
    assert abs(half.shape[0] - _text("train", None, 0, tmp_path, "&test_fraction=0.5").shape[0]) <= 3
    explicit = _text("test", None, 0, tmp_path, f"&test={tmp_path / 'a.txt'}")
    assert text[:10_000].startswith(tok.decode(explicit.flatten().tolist()))


@pytest.mark.parametrize("spec, message", [
    ("text:/no/such/file.txt?tokenizer=zoo:opt-austen", "does not exist"),
    ("austen", "needs a tokenizer"),
    ("text:?tokenizer=zoo:opt-austen", "needs a path"),
    ("austen?tokenizer=zoo:opt-austen&length=two", "length must be an integer"),
    ("austen?tokenizer=zoo:opt-austen&source=cdrom", "auto, embedded or debian"),
])
def test_bad_specs_say_what_to_do(spec: str, message: str) -> None:
    source = AustenSource() if spec.startswith("austen") else TextFileSource()
    with pytest.raises(DataError, match=message):
        source.load(spec, "train", num_samples=4, seed=0)


def test_empty_directory_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no \\*.txt files"):
        corpus.read_text_path(tmp_path)
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(DataError, match="not UTF-8"):
        corpus.read_text_path(tmp_path / "x.txt")


def test_debian_source_needs_its_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(corpus.AUSTEN_ENV, raising=False)
    with pytest.raises(DataError, match="r-cran-janeaustenr"):
        corpus.austen_novels("debian")
    monkeypatch.setenv(corpus.AUSTEN_ENV, str(tmp_path))
    with pytest.raises(DataError, match="Rdata.rdx"):
        corpus.austen_novels("auto")


def test_debian_package_text_equals_embedded_copy() -> None:
    """When the unpacked Debian package is there (QUANTPLUG_AUSTEN_DIR), it gives the embedded text."""
    import os

    if not os.environ.get(corpus.AUSTEN_ENV):
        pytest.skip(f"set {corpus.AUSTEN_ENV} to an unpacked r-cran-janeaustenr data directory")
    assert corpus.austen_novels("debian") == corpus.austen_novels("embedded")


def test_sources_are_registered_through_the_entry_point() -> None:
    session = Session(entry_points=True)
    assert isinstance(session.data_source_for("austen?tokenizer=zoo:opt-austen"), AustenSource)
    assert isinstance(session.data_source_for("text:/x.txt?tokenizer=zoo:opt-austen"), TextFileSource)
