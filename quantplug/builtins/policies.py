"""Built-in activation policies: activations quantized, or kept in full precision, during reconstruction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quantplug.hookspecs import hookimpl
from quantplug.interfaces import ActivationPolicy


class QuantizedActivations(ActivationPolicy):
    """Activations inside the unit are quantized at every iteration (BRECQ with learned steps)."""

    name = "quantized"


class FullPrecisionActivations(ActivationPolicy):
    """Activations inside the unit stay in full precision while its weights are reconstructed (AdaRound)."""

    name = "fp"

    def begin(self, quantizers: Sequence[nn.Module], generator: torch.Generator | None = None) -> None:
        self._saved = [(q, q.enabled) for q in quantizers]
        for q in quantizers:
            q.enabled = False

    def end(self, quantizers: Sequence[nn.Module]) -> None:
        for q, enabled in getattr(self, "_saved", []):
            q.enabled = enabled
        super().end(quantizers)


@hookimpl
def register_activation_policies(register) -> None:  # type: ignore[no-untyped-def]
    register(QuantizedActivations)
    register(FullPrecisionActivations)
