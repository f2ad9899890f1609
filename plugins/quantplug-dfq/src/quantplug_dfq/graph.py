"""Which layer pairs DFQ may touch: ``producer -> [activation] -> consumer``, read from the model graph.

A ``Link`` is a Conv2d / Linear layer (the producer) whose output reaches another Conv2d / Linear layer
(the consumer) through at most one activation and only channel-wise, expectation-preserving operations:

* activations: ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``), ReLU6 / ``Hardtanh(0, u)`` and the
  plugin's ``ChannelClip``; no activation ("identity") is allowed too;
* in between: ``Identity`` (a folded BatchNorm), dropout, a global average pool (``AdaptiveAvgPool2d(1)``
  or ``F.adaptive_avg_pool2d(x, 1)``) and ``flatten(x, 1)`` after such a pool.

Anything else (a residual addition, concatenation, max pooling, reshapes, attention...) ends the search:
no link. A link is *exclusive* when every tensor on its path has exactly one user, i.e. the
producer's output channels reach nothing but the consumer; only exclusive links may be scaled
(equalization) or shifted (bias absorption). Analytic bias correction needs only the expected
consumer input, so it also uses non-exclusive links.

The graph comes from ``torch.fx`` symbolic tracing (quantized layers and ``ChannelClip`` are leaves).
Models that do not trace fall back to the module order inside ``nn.Sequential`` containers, where each
module's output feeds only the next one (MobileNetV2's conv-BN-ReLU6 blocks are found this way too).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantplug.modules import QuantLayer
from quantplug_dfq.activations import ChannelClip

logger = logging.getLogger(__name__)

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, QuantLayer)
_PASS_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout2d)


@dataclass(frozen=True)
class Link:
    """``producer -> activation -> consumer`` (see the module docstring).

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


def _links_from_graph(model: nn.Module, graph: Any) -> list[Link]:
    import torch.fx as fx

    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
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
        exclusive = len(producer_node.users) == 1 and all(len(p.users) == 1 for p in path)
        kind, upper = activation if activation is not None else ("identity", None)
        act_module = None
        if activation_node is not None and activation_node.op == "call_module":
            target = str(activation_node.target)
            act_module = target if calls[target] == 1 else None
        links.append(Link(producer_name, str(node.target), kind, act_module, upper, exclusive,
                          is_padded(consumer), pool_before_activation, "fx"))
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
    instances = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
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
                        links.append(Link(producer, name, act_kind, act_module, upper, True, is_padded(module),
                                          pool_before_activation, "sequential"))
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


def find_links(model: nn.Module) -> list[Link]:
    """Every link of ``model`` in forward order (fx), or in module order (``nn.Sequential`` fallback)."""
    graph = _trace(model)
    if graph is not None:
        return _links_from_graph(model, graph)
    return _links_from_sequential(model)


def replace_with_channel_clip(model: nn.Module, link: Link) -> ChannelClip | None:
    """Make the link's activation a ``ChannelClip`` (in place) and return it; None when it cannot be replaced.

    ReLU6 / ``Hardtanh(0, u)`` becomes ``ChannelClip(u)``; ReLU stays a ReLU (it needs no per-channel
    state) and gives None, as does an activation that is functional or called at several places.
    """
    from quantplug.modules import set_submodule

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
