"""quantplug hook implementations of the torchvision adapter distribution."""

from __future__ import annotations

from quantplug import hookimpl
from quantplug_torchvision.adapter import TorchvisionAdapter
from quantplug_torchvision.sources import FashionMNISTSource, ImageFolderSource, TensorFileSource


@hookimpl
def register_model_adapters(register) -> None:  # type: ignore[no-untyped-def]
    register(TorchvisionAdapter)


@hookimpl
def register_data_sources(register) -> None:  # type: ignore[no-untyped-def]
    for cls in (FashionMNISTSource, ImageFolderSource, TensorFileSource):
        register(cls)
