"""Frozen configuration dataclasses: quantization specs, bit policy, reconstruction settings, recipes.

Everything here serializes to plain JSON (``to_dict``) and back (``from_dict``), which is how a
run records its fully resolved recipe in ``quantplug.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from quantplug.errors import ConfigError

MIN_BITS = 2
MAX_BITS = 8


# --------------------------------------------------------------------------- granularity
@dataclass(frozen=True)
class PerTensor:
    """One scale / zero point for the whole tensor."""

    kind: str = "per_tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale / zero point per slice along ``axis`` (0 = output channels of a weight)."""

    axis: int = 0
    kind: str = "per_channel"


@dataclass(frozen=True)
class PerGroup:
    """One scale / zero point per run of ``group_size`` consecutive input elements of each output row."""

    group_size: int = 128
    kind: str = "per_group"

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ConfigError(f"group_size must be a positive integer, got {self.group_size}")


Granularity = Union[PerTensor, PerChannel, PerGroup]
_GRANULARITIES: dict[str, type] = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_group": PerGroup}


def granularity_from_dict(data: Mapping[str, Any] | str) -> Granularity:
    if isinstance(data, str):
        data = {"kind": data}
    kind = data.get("kind", "per_tensor")
    if kind not in _GRANULARITIES:
        raise ConfigError(f"unknown granularity {kind!r}; use one of {sorted(_GRANULARITIES)}")
    return _GRANULARITIES[kind](**{k: v for k, v in data.items()})


# --------------------------------------------------------------------------- quant spec
def check_bits(bits: Any, role: str | None = None) -> None:
    """Refuse a bit width the affine quantizer cannot use, with the fix for ``role`` (weight / activation)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ConfigError(f"bit width must be an integer, got {bits!r}")
    if MIN_BITS <= bits <= MAX_BITS:
        return
    if role == "activation":
        need = f"activations need at least {MIN_BITS} bits" if bits < MIN_BITS else f"the most is {MAX_BITS}"
        raise ConfigError(f"activation bit width {bits} is not supported: {need}; use {MIN_BITS} to {MAX_BITS}, or "
                          "--a-bits 0 (or 32) to keep activations in full precision")
    lowbit = "1-bit and ternary weights come from the quantplug-lowbit plugin"
    if role == "weight":
        raise ConfigError(f"weight bit width {bits} is not supported by the affine quantizer: use {MIN_BITS} to "
                          f"{MAX_BITS} ({lowbit})")
    raise ConfigError(f"bit width {bits} is not supported by the affine quantizer: use {MIN_BITS} to {MAX_BITS} "
                      f"(activations need at least {MIN_BITS} bits; {lowbit})")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit width, symmetry and quantization granularity.

    Asymmetric grids are unsigned ``[0, 2^b - 1]`` with a zero point; symmetric grids are signed
    ``[-2^(b-1), 2^(b-1) - 1]`` with zero point 0 and ``scale = max|x| / ((qmax - qmin) / 2)``.
    """

    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = field(default_factory=PerTensor)

    def __post_init__(self) -> None:
        check_bits(self.bits)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def with_bits(self, bits: int) -> QuantSpec:
        return dataclasses.replace(self, bits=bits)


# --------------------------------------------------------------------------- components
@dataclass(frozen=True)
class ComponentRef:
    """Names a registered component and the options passed to its ``Config``."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BitPolicy:
    """Which layers get which bit widths.

    By default the first layer (its weights and its input) and the last layer (its weights and its
    input activation) stay at 8 bits; the network output is never quantized. The released BRECQ / QDrop
    code differs at the stem: it leaves the image unquantized, keeps the first layer's *output* at 8 bits
    and does not reconstruct the first layer (``set_first_last_layer_to_8bit``, ``ignore_reconstruction``);
    here the stem's output is quantized at the run's activation bits where the next layers read it, and
    the stem is reconstructed like any unit (an override ``(consumer, W, 8)`` on each layer reading the stem's
    output, W the run's weight bits, keeps that output at 8 bits: ``("layer1.0.conv1", 2, 8)`` on ResNet-18).
    ``overrides`` are ``(glob pattern on the layer name, weight bits, activation bits)``; a bit value of 0 keeps
    that tensor in full precision. Later overrides win.
    """

    first_layer_bits: int | None = 8
    last_layer_bits: int | None = 8
    overrides: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: how many samples, in which batches, from which seed."""

    num_samples: int = 1024
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_samples, int) and self.num_samples < 1:
            raise ConfigError(f"calib.num_samples (--calib-samples) must be at least 1, got {self.num_samples}")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ConfigError(f"calib.batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class ReconConfig:
    """Settings of the reconstruction loop shared by every method."""

    iters: int = 20000
    batch_size: int = 32
    lr: float = 1e-3
    #: learning-rate schedule of the rounding parameters: constant (AdaRound / BRECQ / QDrop) or cosine to 0
    lr_schedule: str = "constant"
    learn_act_step: bool = False
    act_lr: float = 4e-5
    #: "joint": rounding and activation steps learned together with activations quantized (QDrop);
    #: "weights_first": a pass with every activation quantizer off reconstructs the weights, then the
    #: activations are calibrated on the weight-quantized model and (if learn_act_step) a second pass
    #: of ``act_iters`` iterations learns the steps with the weights fixed (BRECQ's released code)
    order: str = "joint"
    act_iters: int = 5000
    cache: str = "cpu"  # cpu | fp16 | disk
    log_every: int = 500

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"recon.lr_schedule must be constant or cosine; got {self.lr_schedule!r}")
        if self.order not in ("joint", "weights_first"):
            raise ConfigError(f"recon.order must be joint or weights_first; got {self.order!r}")
        if self.cache not in ("cpu", "fp16", "disk"):
            raise ConfigError(f"recon.cache must be one of cpu, fp16, disk; got {self.cache!r}")
        if self.iters < 0 or self.batch_size < 1:
            raise ConfigError("recon.iters must be >= 0 and recon.batch_size >= 1")


@dataclass(frozen=True)
class Recipe:
    """A fully resolved method: one component per slot plus hyperparameters."""

    name: str = "nearest"
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(4, False, PerChannel(0)))
    activation: QuantSpec | None = field(default_factory=lambda: QuantSpec(8, False, PerTensor()))
    weight_observer: ComponentRef = field(default_factory=lambda: ComponentRef("mse"))
    activation_observer: ComponentRef = field(default_factory=lambda: ComponentRef("mse"))
    rounding: ComponentRef = field(default_factory=lambda: ComponentRef("nearest"))
    loss: ComponentRef = field(default_factory=lambda: ComponentRef("mse"))
    scheduler: ComponentRef = field(default_factory=lambda: ComponentRef("block"))
    activation_policy: ComponentRef = field(default_factory=lambda: ComponentRef("quantized"))
    data_transforms: tuple[ComponentRef, ...] = ()
    passes: tuple[ComponentRef, ...] = ()
    bits: BitPolicy = field(default_factory=BitPolicy)
    calib: CalibConfig = field(default_factory=CalibConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        return from_jsonable(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# --------------------------------------------------------------------------- serialization
def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_jsonable(v) for v in value]
    return value


def from_jsonable(tp: Any, data: Any, path: str = "") -> Any:
    """Rebuild a value of type ``tp`` from its JSON form (dataclasses, optionals, tuples, unions).

    Every value is checked against its field's type; a mismatch is a :class:`ConfigError` naming the
    dotted ``path`` of the field, the expected type and the value (``recon.iters must be an integer``).
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if data is None:
            if len(args) < len(typing.get_args(tp)):  # Optional
                return None
            raise ConfigError(f"{_where(path)} must not be null")
        if all(a in _GRANULARITIES.values() for a in args):
            if not isinstance(data, (str, Mapping)):
                raise _type_error(path, f"a granularity ({', '.join(sorted(_GRANULARITIES))} or a mapping)", data)
            mapping = {"kind": data} if isinstance(data, str) else data
            kind = mapping.get("kind", "per_tensor")
            if kind not in _GRANULARITIES:
                raise ConfigError(f"unknown granularity {kind!r}; use one of {sorted(_GRANULARITIES)}")
            return from_jsonable(_GRANULARITIES[kind], mapping, path)
        return from_jsonable(args[0], data, path)
    if origin is tuple:
        if not isinstance(data, (list, tuple)):
            raise _type_error(path, "a list", data)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], v, f"{path}[{i}]") for i, v in enumerate(data))
        if len(data) != len(args):
            raise _type_error(path, f"a list of {len(args)} values", data)
        return tuple(from_jsonable(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping for {tp.__name__}{' at ' + path if path else ''}, got {data!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown field(s) {sorted(unknown)} for {tp.__name__}; known: {sorted(names)}")
        kwargs = {k: from_jsonable(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
        if tp is QuantSpec and "bits" in kwargs:  # the recipe's weight or activation spec: a fix for that role
            check_bits(kwargs["bits"], path.rsplit(".", 1)[-1] if path else None)
        return tp(**kwargs)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(data, Mapping):
            raise _type_error(path, "a mapping", data)
        return dict(data)
    return _scalar(tp, data, path)


def _scalar(tp: Any, data: Any, path: str) -> Any:
    """``data`` checked against a scalar type: bool, int, float (an int is accepted and converted), str."""
    if tp is bool:
        if not isinstance(data, bool):
            raise _type_error(path, "true or false", data)
    elif tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise _type_error(path, "an integer", data)
    elif tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise _type_error(path, "a number", data)
        return float(data)
    elif tp is str:
        if not isinstance(data, str):
            raise _type_error(path, "a string", data)
    return data


def _where(path: str) -> str:
    return path or "the value"


def _type_error(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{_where(path)} must be {expected}, got {value!r} ({type(value).__name__})")


# --------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``path.to.field=value``; the value is read as JSON when possible, else as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like path.to.field=value (e.g. recon.iters=500)")
    path, raw = text.split("=", 1)
    path = path.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def apply_overrides(recipe: Recipe, overrides: Mapping[str, Any]) -> Recipe:
    """Return a copy of ``recipe`` with dotted-path overrides applied.

    ``weight.bits=3``, ``recon.iters=500``, ``rounding.name=adaround``, ``rounding.options.reg_weight=0.1``.
    Values are validated by rebuilding the recipe from its dict form.
    """
    data = recipe.to_dict()
    for path, value in overrides.items():
        # a copy: a later override of a nested path must not change the caller's (e.g. a preset's) mapping
        _set_path(data, path.split("."), copy.deepcopy(value), path)
    return Recipe.from_dict(data)


def _set_path(data: dict[str, Any], parts: list[str], value: Any, full: str) -> None:
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {full!r}: {'.'.join(parts[:i])} is not a section")
        if node.get(part) is None:
            if part == "activation":
                node[part] = QuantSpec().__dict__ | {"granularity": {"kind": "per_tensor"}}
            elif part == "options" or (i > 0 and parts[i - 1] == "options"):
                node[part] = {}
            else:
                raise ConfigError(f"unknown override path {full!r}: no section {part!r}")
        node = node[part]
    last = parts[-1]
    if not isinstance(node, dict):
        raise ConfigError(f"cannot set {full!r}")
    inside_options = len(parts) >= 2 and "options" in parts[:-1]
    if last not in node and not inside_options:
        raise ConfigError(f"unknown override path {full!r}; fields here: {sorted(node)}")
    if last == "granularity" and isinstance(value, (str, dict)):
        value = _to_jsonable(granularity_from_dict(value))
    node[last] = value
