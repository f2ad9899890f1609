"""Open an ONNX export directory in onnxruntime, after checking that it is complete and intact."""

from __future__ import annotations

import os
from typing import Any

from quantplug.builtins.exporters import sha256_file
from quantplug.errors import ArtifactError
from quantplug.export import MANIFEST, read_manifest
from quantplug_onnx import ONNX_FILE

_REDO = "re-run `quantplug export RUN_DIR --format onnx`"


def _check_file(export_dir: str, name: Any, expected_sha256: Any) -> str:
    path = os.path.join(export_dir, os.path.basename(str(name)))
    if not os.path.isfile(path):
        raise ArtifactError(f"{export_dir} has no {name}; the export directory is incomplete: {_REDO}")
    if expected_sha256 and sha256_file(path) != expected_sha256:
        raise ArtifactError(f"{path} is corrupt (its SHA-256 does not match {MANIFEST}): {_REDO}")
    return path


def check_export(export_dir: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """``(path of the graph, the manifest's export section)`` of an intact ONNX export, else ``ArtifactError``.

    Checks: the manifest exists, parses and names the ``onnx`` format; the graph (and its external data file,
    if any) exists with the recorded SHA-256; the graph parses; every quantized layer's weight codes have the
    element type the manifest records (``INT4`` / ``UINT4`` / ``INT8`` / ``UINT8``).
    """
    import onnx
    from google.protobuf.message import DecodeError

    from quantplug_onnx._export import codes_key, codes_types

    export_dir = os.fspath(export_dir)
    manifest = read_manifest(export_dir)
    export = manifest.get("export")
    if not isinstance(export, dict) or export.get("format") != "onnx":
        fmt = export.get("format") if isinstance(export, dict) else None
        raise ArtifactError(f"{export_dir} is not an ONNX export (format {fmt!r}); export a run with "
                            "`quantplug export RUN_DIR --format onnx`")
    path = _check_file(export_dir, export.get("file", ONNX_FILE), export.get("sha256"))
    external = export.get("external_data")
    if isinstance(external, dict):
        _check_file(export_dir, external.get("file"), external.get("sha256"))
    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is corrupt ({exc}): {_REDO}") from exc
    if not proto.graph.node:
        raise ArtifactError(f"{path} holds no graph; it is corrupt or truncated: {_REDO}")
    recorded = export.get("weight_types")
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{export_dir}/{MANIFEST} lacks export.weight_types; the manifest is incomplete")
    found = codes_types(proto, {layer: codes_key(layer) for layer in recorded})
    wrong = {layer: (kind, found.get(layer)) for layer, kind in recorded.items() if found.get(layer) != kind}
    if wrong:
        layer, (kind, actual) = next(iter(wrong.items()))
        raise ArtifactError(f"{export_dir}: the graph and {MANIFEST} disagree on the weight codes of {len(wrong)} "
                            f"layer(s), e.g. {layer!r}: manifest {kind}, graph {actual}; the export is corrupt "
                            f"or edited: {_REDO}")
    return path, export


def load_session(export_dir: str | os.PathLike[str], *, exact: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` (CPU, one thread) of an ONNX export directory, after ``check_export``.

    ``exact``: the settings under which onnxruntime computes what the QDQ graph says (see ``ort_session``);
    else onnxruntime's defaults.
    """
    from quantplug_onnx._export import ort_session

    path, _ = check_export(export_dir)
    try:
        return ort_session(path, exact)
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / ... types
        raise ArtifactError(f"onnxruntime cannot load {path} ({str(exc).strip()[:300]}): {_REDO}") from exc
