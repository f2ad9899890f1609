"""quantplug hook implementations of the transformers adapter distribution."""

from __future__ import annotations

from quantplug import hookimpl
from quantplug_transformers.adapter import TransformersAdapter
from quantplug_transformers.sources import AustenSource, TextFileSource


@hookimpl
def register_model_adapters(register) -> None:  # type: ignore[no-untyped-def]
    register(TransformersAdapter)


@hookimpl
def register_data_sources(register) -> None:  # type: ignore[no-untyped-def]
    for cls in (AustenSource, TextFileSource):
        register(cls)
