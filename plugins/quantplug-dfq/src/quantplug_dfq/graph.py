"""Which layer pairs DFQ may touch: ``producer -> [activation] -> consumer``, read from the model graph.

A ``Link`` is a Conv2d / Linear layer (the producer) whose output reaches another Conv2d / Linear layer
(the consumer) through at most one activation and only channel-wise, expectation-preserving operations:

* activations: ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``), ReLU6 / ``Hardtanh(0, u)`` and the
  plugin's ``ChannelClip``; no activation ("identity") is allowed too;
* in between: ``Identity`` (a folded BatchNorm), dropout, a global average pool (``AdaptiveAvgPool2d(1)``
  or ``F.adaptive_avg_pool2d(x, 1)``) and ``flatten(x, 1)`` after such a pool.

Anything else (a residual addition, concatenation, max pooling, reshapes, attention...) ends the search:
no link. A link is *exclusive* when scaling the producer's output channels and the consumer's input
channels by the same factors cannot change anything else: both layers are called exactly once, neither
shares its weights with other code, and every tensor on the path has exactly one user. Only exclusive
links may be scaled (equalization) or shifted (bias absorption). Analytic bias correction needs only the
expected consumer input, so it also uses non-exclusive links.

The graph comes from ``torch.fx`` symbolic tracing (quantized layers and ``ChannelClip`` are leaves).
Models that do not trace fall back to the module order inside ``nn.Sequential`` containers. That order
says nothing about the data flow (a ``forward`` may read an intermediate output of the container, call a
layer twice, or skip one), so a fallback link is exclusive only once ``verify_links`` has checked it on a
calibration batch: scaling the pair by powers of two, which is exact in floating point, must leave every
model output unchanged (up to ``PROBE_TOLERANCE``). Without a batch no fallback link is exclusive.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantplug.interfaces import PassContext
from quantplug.modules import QuantLayer, set_submodule
from quantplug.tensors import to_device
from quantplug_dfq.activations import ChannelClip

logger = logging.getLogger(__name__)

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, QuantLayer)
_PASS_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout2d)

#: largest relative output change (``max |after - before| / max |before|``) a verified fallback link may cause
#: under the power-of-two probe scaling, which is exact in floating point (so this is only a safety margin)
PROBE_TOLERANCE = 1e-6
CONSUMER_CALLED_TWICE = "the consumer is called more than once (it also reads other inputs)"
NOT_VERIFIED = "untraceable model and no calibration batch to check that the pair is exclusive"
CHANGED_OUTPUT = ("untraceable model: scaling the pair changed the output on a calibration batch (its tensors "
                  "have other users)")

#: runs the model on one fixed batch and returns its output (see ``batch_runner``)
BatchRunner = Callable[[nn.Module], Any]


@dataclass(frozen=True)
class Link:
    """``producer -> activation -> consumer`` (see the module docstring).

    ``exclusive``: the pair may be scaled or shifted; if not, ``reason`` says why.
    ``activation``: ``identity``, ``relu``, ``relu6`` (a fixed clip at ``upper``) or ``channel_clip``.
    ``activation_module``: the activation's qualified module name when it is a module called exactly
    once in the forward pass (so it may be replaced), else None. ``pool_before_activation``: an average
    pool sits between the producer and the activation, so the consumer's expected input is unknown.
    """

    producer: str
    consumer: str
    activation: str
    activation_module: str | None
    upper: float | None
    exclusive: bool
    consumer_padded: bool
    pool_before_activation: bool = False
    source: str = "fx"
    reason: str = ""


# ------------------------------------------------------------------------------------------ layer geometry
def out_channels(layer: nn.Module) -> int:
    return int(layer.weight.shape[0])


def in_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear) or hasattr(layer, "in_features"):
        return int(layer.in_features)
    return int(layer.in_channels)


def groups_of(layer: nn.Module) -> int:
    return int(getattr(layer, "groups", 1))


def input_index(layer: nn.Module) -> torch.Tensor:
    """``[out, in / groups]`` tensor: which input channel each weight column reads (grouped convs too)."""
    weight = layer.weight
    out, per_group_in = int(weight.shape[0]), int(weight.shape[1])
    groups = groups_of(layer)
    out_per_group = out // groups
    group = torch.arange(out, device=weight.device) // out_per_group
    return group[:, None] * per_group_in + torch.arange(per_group_in, device=weight.device)[None, :]


def is_padded(layer: nn.Module) -> bool:
    padding = getattr(layer, "padding", 0)
    if isinstance(padding, str):
        return padding != "valid"
    if isinstance(padding, int):
        return padding != 0
    return any(int(p) != 0 for p in padding)


# ------------------------------------------------------------------------------------------ classification
def _is_one(size: Any) -> bool:
    if isinstance(size, int):
        return size == 1
    if isinstance(size, (tuple, list)):
        return all(s == 1 for s in size)
    return False


def _arg(node: Any, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _classify_module(module: nn.Module) -> tuple[str, Any]:
    if isinstance(module, LAYER_TYPES):
        return "layer", None
    if isinstance(module, ChannelClip):
        return "act", ("channel_clip", None)
    if isinstance(module, nn.ReLU):
        return "act", ("relu", None)
    if isinstance(module, nn.Hardtanh) and float(module.min_val) == 0.0 and float(module.max_val) > 0.0:
        return "act", ("relu6", float(module.max_val))
    if isinstance(module, _PASS_MODULES):
        return "pass", None
    if isinstance(module, nn.AdaptiveAvgPool2d) and _is_one(module.output_size):
        return "pool", None
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return "flatten", None
    return "other", None


def _classify_node(node: Any, modules: dict[str, nn.Module]) -> tuple[str, Any]:
    if node.op == "call_module":
        return _classify_module(modules[str(node.target)])
    if node.op == "call_function":
        fn = node.target
        if fn in (F.relu, torch.relu):
            return "act", ("relu", None)
        if fn is F.relu6:
            return "act", ("relu6", 6.0)
        if fn in _DROPOUT_FUNCTIONS and not _arg(node, 2, "training", True):
            return "pass", None
        if fn is F.adaptive_avg_pool2d and _is_one(_arg(node, 1, "output_size", None)):
            return "pool", None
        if fn is torch.flatten and _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1:
            return "flatten", None
    if node.op == "call_method":
        if node.target == "relu":
            return "act", ("relu", None)
        if node.target == "flatten" and _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1:
            return "flatten", None
    return "other", None


# ------------------------------------------------------------------------------------------ fx
def _trace(model: nn.Module) -> Any | None:
    import torch.fx as fx

    class LeafTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if isinstance(m, (QuantLayer, ChannelClip)):
                return True
            return super().is_leaf_module(m, qualname)

    try:
        return LeafTracer().trace(model)
    except Exception as exc:  # data-dependent control flow, unsupported ops...
        logger.info("torch.fx could not trace %s (%s); using nn.Sequential module order", type(model).__name__, exc)
        return None


def _layers_sharing_weights(model: nn.Module, graph: Any | None) -> set[int]:
    """``id`` of every layer whose parameters another module holds too, or that the graph reads directly
    (``get_attr``, e.g. ``F.linear(x, self.fc.weight)``): scaling its weights changes other computations."""
    owners: dict[int, set[int]] = defaultdict(set)
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)].add(id(module))
    shared: set[int] = set()
    for module in model.modules():
        if isinstance(module, LAYER_TYPES) and any(len(owners[id(p)]) > 1 for p in module.parameters(recurse=False)):
            shared.add(id(module))
    if graph is not None:
        for node in graph.nodes:
            if node.op == "get_attr":
                owner, _, _ = str(node.target).rpartition(".")
                shared.add(id(model.get_submodule(owner) if owner else model))
    return shared


def _not_exclusive(producer: nn.Module, consumer: nn.Module, calls: Mapping[int, int], shared: set[int]) -> str:
    """Why scaling the pair would change more than the pair ("" when nothing layer-level forbids it)."""
    if calls[id(producer)] != 1:
        return "the producer is called more than once"
    if calls[id(consumer)] != 1:
        return CONSUMER_CALLED_TWICE
    if id(producer) in shared or id(consumer) in shared:
        return "a layer's weights are shared with other modules or read directly"
    return ""


def _links_from_graph(model: nn.Module, graph: Any) -> list[Link]:
    import torch.fx as fx

    modules = dict(model.named_modules())
    # by module object: one module registered under two names is still one set of weights
    calls = Counter(id(modules[str(n.target)]) for n in graph.nodes if n.op == "call_module")
    shared = _layers_sharing_weights(model, graph)
    links: list[Link] = []
    for node in graph.nodes:
        if node.op != "call_module" or _classify_node(node, modules)[0] != "layer" or not node.args:
            continue
        consumer = modules[str(node.target)]
        current = node.args[0]
        activation: tuple[str, Any] | None = None
        activation_node = None
        path: list[Any] = []
        flattened = pooled = pool_before_activation = False
        producer_node = None
        while isinstance(current, fx.Node):
            kind, info = _classify_node(current, modules)
            if kind == "layer":
                producer_node = current
                break
            if kind == "act":
                if activation is not None:
                    break
                activation, activation_node = info, current
            elif kind == "pool":
                pooled = True
                pool_before_activation = pool_before_activation or activation is not None
            elif kind == "flatten":
                if flattened:
                    break
                flattened = True
            elif kind != "pass":
                break
            path.append(current)
            if not current.args or not isinstance(current.args[0], fx.Node):
                break
            current = current.args[0]
        if producer_node is None:
            continue
        producer_name = str(producer_node.target)
        producer = modules[producer_name]
        if flattened and not pooled and not isinstance(producer, nn.Linear) and not hasattr(producer, "in_features"):
            continue  # flatten of a spatial map mixes positions into features
        if out_channels(producer) != in_channels(consumer):
            continue
        reason = _not_exclusive(producer, consumer, calls, shared)
        if not reason and (len(producer_node.users) != 1 or any(len(p.users) != 1 for p in path)):
            reason = "the producer's output has other users"
        kind, upper = activation if activation is not None else ("identity", None)
        act_module = None
        if activation_node is not None and activation_node.op == "call_module":
            target = str(activation_node.target)
            act_module = target if calls[id(modules[target])] == 1 else None
        links.append(Link(producer_name, str(node.target), kind, act_module, upper, not reason,
                          is_padded(consumer), pool_before_activation, "fx", reason))
    return links


# ------------------------------------------------------------------------------------------ fallback
def _sequential_roots(model: nn.Module) -> Iterator[tuple[str, nn.Sequential]]:
    parents: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        for child_name, _ in module.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = module
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and not isinstance(parents.get(name), nn.Sequential):
            yield name, module


def _leaves(prefix: str, seq: nn.Sequential) -> Iterator[tuple[str, nn.Module]]:
    for child_name, child in seq.named_children():
        full = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, nn.Sequential):
            yield from _leaves(full, child)
        else:
            yield full, child


def _links_from_sequential(model: nn.Module) -> list[Link]:
    """Candidate links in module order. Whether the forward pass chains the modules like this is unknown:
    a link is exclusive here only as far as the module tree can tell (a module that appears twice, or shares
    its weights, is not), and ``verify_links`` must confirm it on data."""
    instances = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    shared = _layers_sharing_weights(model, None)
    links: list[Link] = []
    for root_name, root in _sequential_roots(model):
        producer: str | None = None
        activation: tuple[str, Any] | None = None
        act_module: str | None = None
        pooled = pool_before_activation = flattened = False
        for name, module in _leaves(root_name, root):
            kind, info = _classify_module(module)
            if kind == "layer":
                if producer is not None:
                    prod = model.get_submodule(producer)
                    flat_ok = not flattened or pooled or hasattr(prod, "in_features")
                    if flat_ok and out_channels(prod) == in_channels(module):
                        act_kind, upper = activation if activation is not None else ("identity", None)
                        reason = _not_exclusive(prod, module, instances, shared)
                        links.append(Link(producer, name, act_kind, act_module, upper, not reason,
                                          is_padded(module), pool_before_activation, "sequential", reason))
                producer, activation, act_module = name, None, None
                pooled = pool_before_activation = flattened = False
            elif kind == "act" and activation is None and producer is not None:
                activation = info
                act_module = name if instances[id(module)] == 1 else None
                pool_before_activation = pooled
            elif kind == "pool":
                pooled = True
            elif kind == "flatten" and not flattened:
                flattened = True
            elif kind != "pass":
                producer = None  # anything else breaks the chain
    return links


def find_links(model: nn.Module, run_batch: BatchRunner | None = None) -> list[Link]:
    """Every link of ``model`` in forward order (fx), or in module order (``nn.Sequential`` fallback).

    Fallback links are checked by ``verify_links`` with ``run_batch`` (see ``batch_runner``); without it
    none of them is exclusive.
    """
    graph = _trace(model)
    if graph is not None:
        return _links_from_graph(model, graph)
    return verify_links(model, _links_from_sequential(model), run_batch)


# ------------------------------------------------------------------------------------------ verification
def batch_runner(ctx: PassContext) -> BatchRunner | None:
    """Runs a model on the first calibration batch of a pass context (None without calibration data)."""
    if not ctx.calib_inputs:
        return None
    batch = to_device(ctx.calib_inputs[0], ctx.device)
    adapter = ctx.adapter
    if adapter is None:
        return lambda model: model(batch)
    return lambda model: adapter.forward(model, batch)


def _float_tensors(output: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a model output (a tensor, or mappings and sequences of them)."""
    if isinstance(output, torch.Tensor):
        return [output.detach()] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _float_tensors(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in _float_tensors(v)]
    return []


def _same_output(before: list[torch.Tensor], after: list[torch.Tensor], tolerance: float) -> bool:
    """Every tensor within ``tolerance`` times its largest magnitude (NaN or inf where there was none: not)."""
    if len(before) != len(after):
        return False
    for b, a in zip(before, after, strict=True):
        if b.shape != a.shape:
            return False
        if not b.numel():
            continue
        top = float(b.abs().max())
        if not float((a - b).abs().max()) <= tolerance * top:
            return False
    return True


def probe_scales(channels: int, device: torch.device) -> torch.Tensor:
    """Per-channel factors 2, 1/2, 2, ...: multiplying by a power of two is exact in floating point, so an
    exclusive pair reproduces the model's output bit for bit."""
    return torch.where(torch.arange(channels, device=device) % 2 == 0, 2.0, 0.5)


def _pair_tensors(producer: nn.Module, consumer: nn.Module) -> list[torch.Tensor]:
    return [t for t in (producer.weight, producer.bias, consumer.weight) if t is not None]


@torch.no_grad()
def _changes_output(model: nn.Module, link: Link, run_batch: BatchRunner, reference: list[torch.Tensor],
                    tolerance: float) -> bool | None:
    """Does scaling the link (``scale_pair`` with ``probe_scales``) change the output? None: cannot probe.
    The model is left as it was."""
    producer, consumer = model.get_submodule(link.producer), model.get_submodule(link.consumer)
    original_act: nn.Module | None = None
    clip: ChannelClip | None = None
    if link.activation in ("relu6", "channel_clip"):
        if link.activation_module is None:
            return None
        original_act = model.get_submodule(link.activation_module)
        clip = replace_with_channel_clip(model, link)
        if clip is None:
            return None
    saved = [t.detach().clone() for t in _pair_tensors(producer, consumer)]
    saved_upper = clip.upper.clone() if clip is not None else None
    try:
        scale_pair(producer, consumer, probe_scales(out_channels(producer), producer.weight.device), clip)
        return not _same_output(reference, _float_tensors(run_batch(model)), tolerance)
    finally:
        for tensor, value in zip(_pair_tensors(producer, consumer), saved, strict=True):
            tensor.copy_(value)
        if clip is not None and saved_upper is not None:
            clip.upper.copy_(saved_upper)
        if original_act is not None and link.activation_module is not None:
            set_submodule(model, link.activation_module, original_act)


def verify_links(model: nn.Module, links: list[Link], run_batch: BatchRunner | None,
                 tolerance: float = PROBE_TOLERANCE) -> list[Link]:
    """``links`` with every exclusive fallback (``sequential``) link checked on data; fx links are kept.

    A fallback link stays exclusive only if scaling it by ``probe_scales`` (the change equalization makes,
    with factors that are exact in floating point) leaves every float output of ``run_batch(model)``
    within ``tolerance``; otherwise it becomes non-exclusive, with the reason. Without ``run_batch`` no
    fallback link is exclusive. The model is left as it was.
    """
    candidates = [i for i, link in enumerate(links) if link.source == "sequential" and link.exclusive]
    if not candidates:
        return links
    out = list(links)
    if run_batch is None:
        for i in candidates:
            out[i] = replace(links[i], exclusive=False, reason=NOT_VERIFIED)
        logger.warning("%s does not trace with torch.fx and no calibration batch was given: its %d layer pairs "
                       "are left alone", type(model).__name__, len(candidates))
        return out
    with torch.no_grad():
        reference = _float_tensors(run_batch(model))
    for i in candidates:
        changed = _changes_output(model, links[i], run_batch, reference, tolerance) if reference else None
        if changed is None:
            out[i] = replace(links[i], exclusive=False, reason="untraceable model: the pair cannot be checked "
                             "(a shared activation, or no float output)")
        elif changed:
            out[i] = replace(links[i], exclusive=False, reason=CHANGED_OUTPUT)
            logger.warning("%s -> %s: scaling the pair changed the model's output on a calibration batch (the "
                           "forward pass uses its tensors elsewhere); the pair is left alone",
                           links[i].producer, links[i].consumer)
    return out


@torch.no_grad()
def scale_pair(producer: nn.Module, consumer: nn.Module, scales: torch.Tensor,
               clip: ChannelClip | None = None) -> None:
    """Divide the producer's output channels (and a per-channel clip after it) by ``scales`` and multiply the
    consumer's input channels by them: an exclusive pair computes the same function."""
    view = (-1,) + (1,) * (producer.weight.dim() - 1)
    producer.weight.div_(scales.reshape(view))
    if producer.bias is not None:
        producer.bias.div_(scales)
    factor = scales[input_index(consumer)]  # [out, in / groups]
    consumer.weight.mul_(factor.reshape(factor.shape + (1,) * (consumer.weight.dim() - 2)))
    if clip is not None:
        clip.upper.div_(scales.to(clip.upper.device))


def replace_with_channel_clip(model: nn.Module, link: Link) -> ChannelClip | None:
    """Make the link's activation a ``ChannelClip`` (in place) and return it; None when it cannot be replaced.

    ReLU6 / ``Hardtanh(0, u)`` becomes ``ChannelClip(u)``; ReLU stays a ReLU (it needs no per-channel
    state) and gives None, as does an activation that is functional or called at several places.
    """
    if link.activation_module is None:
        return None
    module = model.get_submodule(link.activation_module)
    if isinstance(module, ChannelClip):
        return module
    if link.activation != "relu6" or link.upper is None or not math.isfinite(link.upper):
        return None
    producer = model.get_submodule(link.producer)
    channel_dim = -1 if hasattr(producer, "in_features") else 1
    clip = ChannelClip(torch.full((out_channels(producer),), float(link.upper), device=producer.weight.device),
                       channel_dim)
    set_submodule(model, link.activation_module, clip)
    return clip
