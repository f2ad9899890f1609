"""Plain text for language-model calibration and evaluation: the Jane Austen corpus and text files.

The six novels of Jane Austen (public domain) ship inside this package as ``data/austen.json.xz``
(1.1 MB), the text of the R package janeaustenr (Debian ``r-cran-janeaustenr``). The same text can be
read from an unpacked copy of that Debian package (``$QUANTPLUG_AUSTEN_DIR`` pointing at the
directory holding ``Rdata.rdb`` / ``Rdata.rdx``, read with the PyPI package ``rdata``).

Split, as WikiText-2's train / test: five novels for training and calibration, *Persuasion* held out
for perplexity.
"""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import os
import zlib
from importlib import resources
from pathlib import Path

from quantplug.errors import DataError

logger = logging.getLogger(__name__)

AUSTEN_ENV = "QUANTPLUG_AUSTEN_DIR"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
HELD_OUT = ("persuasion",)
TRAIN = tuple(n for n in NOVELS if n not in HELD_OUT)
DEBIAN_HINT = (
    "`apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb DIR`, `pip install rdata`, "
    f"and set {AUSTEN_ENV}=DIR/usr/lib/R/site-library/janeaustenr/data"
)


def embedded_path() -> Path:
    return Path(str(resources.files("quantplug_transformers").joinpath("data", "austen.json.xz")))


def load_embedded() -> dict[str, str]:
    path = embedded_path()
    if not path.is_file():
        raise DataError(f"the embedded Austen text {path} is missing (a broken install?); reinstall "
                        f"quantplug-transformers or use the Debian package: {DEBIAN_HINT}")
    return dict(json.loads(lzma.decompress(path.read_bytes()).decode("utf-8")))


def load_rdata(directory: str | os.PathLike[str]) -> dict[str, str]:
    """The novels from janeaustenr's R lazy-load database (``Rdata.rdx`` index, ``Rdata.rdb`` blobs)."""
    base = Path(directory)
    rdx, rdb = base / "Rdata.rdx", base / "Rdata.rdb"
    if not rdx.is_file() or not rdb.is_file():
        raise DataError(f"{base} has no Rdata.rdx / Rdata.rdb; unpack the Debian package: {DEBIAN_HINT}")
    try:
        import rdata
    except ImportError as exc:
        raise DataError("reading janeaustenr's R database needs the PyPI package rdata: pip install rdata") from exc
    import warnings

    def parse(raw: bytes) -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a lazy-load blob has no file header
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdx.read_bytes()))
    blob = rdb.read_bytes()
    out: dict[str, str] = {}
    for name, (offset, length) in index["variables"].items():  # type: ignore[index]
        start, stop = int(offset), int(offset) + int(length)
        lines = parse(zlib.decompress(blob[start + 4:stop]))  # 4-byte length header, then zlib data
        out[str(name)] = "\n".join(str(line) for line in lines)  # type: ignore[attr-defined]
    return out


def austen_novels(source: str = "auto") -> dict[str, str]:
    """``{novel: text}``: ``embedded``, ``debian`` (``$QUANTPLUG_AUSTEN_DIR``), or ``auto`` (Debian if set)."""
    if source not in ("auto", "embedded", "debian"):
        raise DataError(f"Austen source must be auto, embedded or debian, not {source!r}")
    directory = os.environ.get(AUSTEN_ENV)
    if source == "debian" or (source == "auto" and directory):
        if not directory:
            raise DataError(f"source=debian needs {AUSTEN_ENV}: {DEBIAN_HINT}")
        novels = load_rdata(directory)
    else:
        novels = load_embedded()
    missing = [n for n in NOVELS if n not in novels]
    if missing:
        raise DataError(f"the Austen text lacks {missing}; found {sorted(novels)}")
    return novels


def austen_text(split: str, source: str = "auto") -> str:
    """Training text (five novels) or the held-out text (*Persuasion*), novels separated by blank lines."""
    if split not in ("train", "test"):
        raise DataError(f"split must be train or test, not {split!r}")
    novels = austen_novels(source)
    names = TRAIN if split == "train" else HELD_OUT
    return "\n\n".join(novels[n] for n in names)


def read_text_path(path: str | os.PathLike[str]) -> str:
    """A UTF-8 text file, or every ``*.txt`` file of a directory (sorted, recursively) joined by blank lines."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise DataError(f"directory {p} holds no *.txt files; point at a text file or a directory of them")
    else:
        raise DataError(f"text path {p} does not exist; give a UTF-8 text file or a directory of *.txt files")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{f} is not UTF-8 text ({exc}); convert it first") from exc
    text = "\n\n".join(parts)
    if not text.strip():
        raise DataError(f"{p} contains no text")
    return text
