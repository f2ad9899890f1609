"""Component base classes: the typed objects plugins register and the engine calls directly.

Every component class has a lowercase ``name``, a nested frozen ``Config`` dataclass holding its
options, and a docstring citing its source. Registration happens once per session through the
``register_*`` hooks; after that the engine calls methods on these objects, never ``pm.hook``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from quantplug.config import QuantSpec, from_jsonable
from quantplug.errors import ConfigError


@dataclass(frozen=True)
class NoOptions:
    """Config of a component that takes no options."""


class Component:
    """Base of every component kind."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def make_config(cls, options: Mapping[str, Any] | None) -> Any:
        """Build the ``Config`` from a mapping, rejecting unknown option names with a clear message."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(
                f"{cls.kind} {cls.name!r} has no option(s) {sorted(unknown)}; its options are {sorted(known) or 'none'}"
            )
        try:
            typing.get_type_hints(cls.Config)
        except Exception:  # annotations that do not resolve at run time: the values are passed unchecked
            checked = False
        else:
            checked = True
        try:
            if checked:  # each value against its field's type, as recipe fields are (ints become floats)
                return from_jsonable(cls.Config, options, cls.name)
            return cls.Config(**options)
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"bad options for {cls.kind} {cls.name!r}: {exc}") from exc

    @classmethod
    def describe(cls) -> dict[str, Any]:
        doc = (cls.__doc__ or "").strip()
        return {
            "kind": cls.kind,
            "name": cls.name,
            "summary": doc.splitlines()[0] if doc else "",
            "doc": doc,
            "options": {f.name: _default_repr(f) for f in dataclasses.fields(cls.Config)},
        }


def _default_repr(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


# --------------------------------------------------------------------------- observers
class Observer(Component):
    """Collects statistics of one tensor and turns them into a scale and zero point.

    One instance per quantized tensor. ``observe`` sees the tensor reshaped into rows, one row per
    quantization group (``[1, N]`` per-tensor, ``[C, N]`` per-channel, ``[G, group_size]`` per-group);
    ``compute`` returns ``(scale, zero_point)``, each of shape ``[rows]``, zero points integer-valued floats.
    """

    kind = "observer"

    def __init__(self, spec: QuantSpec, config: Any = None) -> None:
        super().__init__(config)
        self.spec = spec

    def observe(self, rows: torch.Tensor, batch_size: int | None = None) -> None:
        """Accumulate statistics of one batch; ``batch_size`` is the number of samples in it (activations)."""
        raise NotImplementedError

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


# --------------------------------------------------------------------------- rounding
class WeightRounder(nn.Module):
    """Per-layer rounding state: produces the fake-quantized weight, a regularizer, and hard integer codes."""

    def forward(self) -> torch.Tensor:  # fake-quantized weight, same shape as the layer's weight
        raise NotImplementedError

    def step(self, progress: float) -> None:
        """Called before each iteration with ``progress`` in [0, 1] (e.g. NWQ's annealed softmax temperature)."""

    def regularization(self, progress: float) -> torch.Tensor | None:
        """Extra loss term at ``progress`` in [0, 1] of the unit's iterations (None: no term)."""
        return None

    def hard_codes(self) -> torch.Tensor:
        """Final integer codes (grid indices including the zero point), shape of the weight."""
        raise NotImplementedError

    def final_qparams(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Scale and zero point (``[rows]``) the hard codes refer to, when the rounding learned its own grid
        (FlexRound's s1); None keeps the layer's weight quantizer as it is. Called before ``hard_codes``."""
        return None


class Rounding(Component):
    """Decides how weights land on the quantization grid."""

    kind = "rounding"
    learnable: ClassVar[bool] = False

    def attach(self, layer: nn.Module, *, generator: torch.Generator | None = None) -> WeightRounder:
        """Create the rounding state for a quantized layer (``QuantConv2d`` / ``QuantLinear``).

        ``generator`` is the unit's seeded random generator (use it for any randomness).
        """
        raise NotImplementedError


# --------------------------------------------------------------------------- loss
@dataclass
class LossContext:
    """Per-batch extras a loss may use: cached tensors it asked for, and the iteration progress.

    ``quantized_output`` is set only for a loss whose ``needs_quantized_output`` is True, and only while an
    activation policy mixes in full precision (QDrop's drop): the unit's output for the same batch on its
    quantized input, with every activation quantized (policy off), or, for a loss whose
    ``quantized_output_keeps_policy`` is True, with the unit's input quantized in full and the policy's
    mixing inside the unit left on. ``None`` otherwise, when the output already is that.
    """

    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)
    progress: float = 0.0
    quantized_output: torch.Tensor | None = None


class ReconstructionLoss(Component):
    """Objective between the quantized unit's output and the full-precision target."""

    kind = "loss"
    #: names of per-sample tensors the engine must cache for this loss (see ``capture_extras``)
    extra_keys: ClassVar[tuple[str, ...]] = ()
    #: True: the engine also runs the unit on its quantized input with the activation policy switched off
    #: and passes that output as ``LossContext.quantized_output`` (PD-Quant's second term). May be an
    #: instance attribute when a config option decides it.
    needs_quantized_output: bool = False
    #: with ``needs_quantized_output``: True keeps the activation policy's mixing inside the unit for that second
    #: output and only quantizes the unit's input in full (PD-Quant's released code); needs a policy whose
    #: ``controls_unit_entry`` is True
    quantized_output_keeps_policy: bool = False

    def capture_extras(self, run: Any, unit: Any) -> Mapping[str, torch.Tensor]:
        """Per-sample tensors ``[num_calibration_samples, ...]`` for ``unit`` (e.g. squared task-loss
        gradients w.r.t. the unit output for the Fisher loss), in calibration order. The engine slices
        them with each iteration's sample indices into ``LossContext.extras``."""
        return {}

    def begin(self, run: Any, unit: Any) -> None:
        """Called once ``unit``'s extras are captured, before its first loss evaluation (e.g. to hook the
        quantized unit's intermediate outputs, as NWQ's activation regularization does)."""

    def end(self, run: Any, unit: Any) -> None:
        """Called after the unit's last loss evaluation: undo whatever ``begin`` set up."""

    def __call__(self, output: torch.Tensor, target: torch.Tensor, context: LossContext) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------- scheduler
@dataclass(frozen=True)
class UnitSpec:
    """One node of a model's structure as an adapter describes it.

    ``modules`` are the qualified names of the submodules executed one after another to run this
    block; ``layers`` are the quantizable layers inside it; ``stage`` groups consecutive blocks.
    The list of blocks an adapter returns is a chain: each block's output is the next one's input.
    """

    name: str
    modules: tuple[str, ...]
    layers: tuple[str, ...]
    stage: str = ""
    kind: str = "block"


@dataclass(frozen=True)
class ReconUnit:
    """What the engine reconstructs in one go: consecutive blocks, or a single layer."""

    name: str
    blocks: tuple[str, ...] = ()
    layer: str | None = None

    @property
    def is_layer(self) -> bool:
        return self.layer is not None


class GranularityScheduler(Component):
    """Reconstruction granularity: which units are reconstructed, in which order."""

    kind = "scheduler"

    def bind(self, model: nn.Module) -> None:
        """Called once before ``plan`` with the BN-folded full-precision model (default: ignored)."""

    def plan(self, blocks: Sequence[UnitSpec]) -> list[ReconUnit]:
        raise NotImplementedError


# --------------------------------------------------------------------------- activation policy
class ActivationPolicy(Component):
    """Which activations are quantized while a unit is reconstructed (QDrop's drop, NWQ's mixup...)."""

    kind = "activation_policy"
    #: the engine caches the unit's full-precision inputs too when True
    needs_fp_inputs: ClassVar[bool] = False

    def begin(self, quantizers: Sequence[nn.Module], generator: torch.Generator | None = None) -> None:
        """Configure the input quantizers of the unit about to be reconstructed."""

    def step(self, progress: float) -> None:
        """Called before each iteration with progress in [0, 1]."""

    #: True if ``quantize_unit_entry`` is implemented (the unit's input can be quantized in full while the mixing
    #: inside the unit goes on)
    controls_unit_entry: ClassVar[bool] = False

    def mix_unit_input(self, quant_input: torch.Tensor, fp_input: torch.Tensor | None) -> torch.Tensor:
        """The unit's input for this iteration, from the quantized-model and full-precision inputs."""
        return quant_input

    def quantize_unit_entry(self, in_full: bool) -> None:
        """While ``in_full``: quantizers reading the unit's input quantize every element; others mix as usual."""
        raise NotImplementedError(f"activation policy {self.name!r} does not control the unit's entry")

    def end(self, quantizers: Sequence[nn.Module]) -> None:
        """Restore plain quantization after the unit is done."""
        for q in quantizers:
            q.mixer = None
            q.selector = None


# --------------------------------------------------------------------------- data
class DataTransform(Component):
    """Changes calibration inputs of a unit before reconstruction (e.g. PD-Quant distribution correction)."""

    kind = "data_transform"
    #: "inputs": the quantized-model inputs of the unit are transformed; "fp_inputs": the full-precision
    #: inputs are, and the unit's full-precision targets are recomputed from them (PD-Quant's correction)
    applies_to: ClassVar[str] = "inputs"

    def apply(self, run: Any, unit: ReconUnit, inputs: torch.Tensor) -> torch.Tensor:
        """Return the transformed version of one batch of the unit's cached inputs (same shape)."""
        raise NotImplementedError


@dataclass
class PassContext:
    """What a ``ModelPass`` may use: the run's recipe, adapter, data and models.

    ``fp_model`` is the full-precision reference (BN folded; at stage ``float`` it is the model being
    changed itself). ``calib_inputs`` / ``calib_targets`` are the calibration batches. ``model_id`` and
    ``model_options`` name the run's model (None outside a run): a pass that loads more data loads it with
    ``session.model_data(model_id, spec, split, model_options=...)`` so the adapter can complete the spec.
    """

    session: Any
    recipe: Any
    adapter: Any
    fp_model: nn.Module
    calib_inputs: list[Any]
    calib_targets: list[Any]
    device: torch.device
    seed: int
    stage: str
    info: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None
    model_options: Mapping[str, Any] | None = None


class ModelPass(Component):
    """A whole-model step at a fixed stage of a run (equalization, bias correction, bit allocation, QAT).

    Stages, in run order:

    * ``float``: after BatchNorm folding, before quantizers are inserted. The pass changes the float
      model in place; the full-precision reference is copied *after* it, so it must keep the
      network's function (cross-layer equalization does).
    * ``prepared``: quantizers are in place, nothing is calibrated (e.g. choose per-layer bit widths).
    * ``quantized``: after calibration and reconstruction, before evaluation (e.g. bias correction,
      quantization-aware fine-tuning).

    ``run`` changes ``model`` in place and returns a JSON-able summary for the run manifest.

    A saved run stores the model's state, not how a ``float`` pass changed its modules: ``quantplug.load``
    rebuilds the model from its id, calls ``rebuild(model, summary)`` of every ``float`` pass of the recipe
    (in order, with the summary its ``run`` returned) on the folded float model, prepares it and loads the
    state. A pass that replaces modules records in its summary what ``rebuild`` needs to replace them again;
    values (weights, buffers) come from the saved state. The default does nothing (a pass that changes only
    values).
    """

    kind = "model_pass"
    stage: ClassVar[str] = "quantized"

    def run(self, model: nn.Module, ctx: PassContext) -> dict[str, Any]:
        raise NotImplementedError

    def rebuild(self, model: nn.Module, summary: Mapping[str, Any]) -> None:
        """Redo the module replacements ``run`` made, from its recorded ``summary`` (see the class docstring)."""


PASS_STAGES = ("float", "prepared", "quantized")


class DataSource(Component):
    """Provides datasets for calibration and evaluation from a data spec string."""

    kind = "data_source"
    prefixes: ClassVar[tuple[str, ...]] = ()

    def can_load(self, spec: str) -> bool:
        return any(spec == p or spec.startswith(p + ":") for p in self.prefixes)

    def load(self, spec: str, split: str, *, num_samples: int | None, seed: int) -> torch.utils.data.Dataset:
        raise NotImplementedError


# --------------------------------------------------------------------------- models
class ModelAdapter(Component):
    """Loads a model family and tells the engine its structure, forward, task loss and metrics."""

    kind = "model_adapter"
    prefixes: ClassVar[tuple[str, ...]] = ()
    #: the model ``quantplug apply`` uses when none is given (if ``default_available()``)
    default_model: ClassVar[str | None] = None

    def default_available(self) -> bool:
        """Whether ``default_model`` can be loaded offline right now (e.g. its weights ship with the package)."""
        return self.default_model is not None

    def can_load(self, model_id: str) -> bool:
        return any(model_id.startswith(p + ":") for p in self.prefixes)

    def load(self, model_id: str, *, device: torch.device, options: Mapping[str, Any] | None = None) -> nn.Module:
        raise NotImplementedError

    def default_data(self, model_id: str) -> str | None:
        """The data spec used when the user gives none (None: data is required)."""
        return None

    def bind_data(self, model_id: str, data: str, options: Mapping[str, Any] | None = None) -> str:
        """The data spec ``data`` completed with what this model needs of its data (default: ``data``).

        Called before any data is loaded, with the model's load ``options``; e.g. the torchvision adapter adds
        the preprocessing of the model's pretrained weights and its number of classes to an image-folder
        spec. The run's manifest keeps ``data`` as given; ``quantplug eval`` binds it again.
        """
        return data

    def blocks(self, model: nn.Module) -> list[UnitSpec]:
        raise NotImplementedError

    def block_module(self, model: nn.Module, block: UnitSpec) -> nn.Module:
        """An executable module running ``block``'s submodules in sequence."""
        mods = [model.get_submodule(n) for n in block.modules]
        return mods[0] if len(mods) == 1 else nn.Sequential(*mods)

    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        """Split a data-loader batch into (model input, target) on ``device``."""
        inputs, targets = batch
        return inputs.to(device), targets.to(device)

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return model(inputs)

    def task_loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: Any) -> dict[str, float]:
        """Per-batch metric sums plus a ``count``; ``evaluate`` adds them over batches."""
        raise NotImplementedError

    def finalize_metrics(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Turn summed metrics into final values (default: divide by ``count``)."""
        count = max(sums.get("count", 1.0), 1.0)
        return {k: v / count for k, v in sums.items() if k != "count"}

    def quantizable_layers(self, model: nn.Module) -> list[str]:
        """Names of the Conv2d / Linear layers to quantize (default: all of them), in forward order."""
        from quantplug.modules import quantizable_layers

        return quantizable_layers(model)

    def first_last_layers(self, model: nn.Module) -> tuple[str | None, str | None]:
        """The layers the bit policy keeps at 8 bits (default: first and last quantizable layer); None for no
        such layer (e.g. a transformer, whose embeddings and head stay in full precision)."""
        names = self.quantizable_layers(model)
        return (names[0], names[-1]) if names else (None, None)

    def fold_batchnorm(self, model: nn.Module) -> nn.Module:
        from quantplug.bn_fold import fold_batchnorm

        return fold_batchnorm(model)


class Exporter(Component):
    """Writes a deployable artifact from a quantized model."""

    kind = "exporter"

    def export(self, model: nn.Module, run_dir: Any, out_dir: Any) -> dict[str, Any]:
        raise NotImplementedError


COMPONENT_KINDS: dict[str, type[Component]] = {
    "observer": Observer,
    "rounding": Rounding,
    "loss": ReconstructionLoss,
    "scheduler": GranularityScheduler,
    "activation_policy": ActivationPolicy,
    "data_transform": DataTransform,
    "data_source": DataSource,
    "model_adapter": ModelAdapter,
    "exporter": Exporter,
}


def iter_component_kinds() -> Iterable[str]:
    return COMPONENT_KINDS.keys()
