"""Fold BatchNorm into the preceding convolution or linear layer (eval-mode statistics)."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def fuse_conv_bn(conv: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> None:
    """In place: ``conv`` computes ``bn(conv(x))``; BN's running statistics and affine terms are absorbed."""
    with torch.no_grad():
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.mul_(factor.reshape(shape))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = beta + (bias - bn.running_mean) * factor
        conv.bias = nn.Parameter(new_bias)


def _pairs_from_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    try:
        import torch.fx as fx

        graph = fx.symbolic_trace(model).graph
    except Exception:  # models with data-dependent control flow are not traceable
        return None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), (nn.BatchNorm2d, nn.BatchNorm1d)):
            continue
        prev = node.args[0] if node.args else None
        if (
            isinstance(prev, fx.Node)
            and prev.op == "call_module"
            and isinstance(modules.get(prev.target), (nn.Conv2d, nn.Linear))
            and len(prev.users) == 1
        ):
            pairs.append((str(prev.target), str(node.target)))
    return pairs


def _pairs_from_order(model: nn.Module) -> list[tuple[str, str]]:
    """Fallback: a BatchNorm registered right after a conv in the same parent follows it."""
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if isinstance(a, (nn.Conv2d, nn.Linear)) and isinstance(b, (nn.BatchNorm2d, nn.BatchNorm1d)):
                prefix = parent_name + "." if parent_name else ""
                pairs.append((prefix + name_a, prefix + name_b))
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every conv -> BN pair in place (model must be in eval mode); BN modules become ``Identity``.

    The folded statistics stay available as ``model.quantplug_bn_stats``: ``{conv name: {"mean", "var",
    "weight", "bias", "eps"}}`` (what PD-Quant's distribution correction and analytic bias correction need).
    """
    from quantplug.modules import set_submodule

    model.eval()
    pairs = _pairs_from_fx(model)
    if pairs is None:
        pairs = _pairs_from_order(model)
    stats: dict[str, dict[str, object]] = dict(getattr(model, "quantplug_bn_stats", {}))
    for conv_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        stats[conv_name] = {
            "mean": bn.running_mean.detach().clone(), "var": bn.running_var.detach().clone(),
            "weight": bn.weight.detach().clone() if bn.affine else None,
            "bias": bn.bias.detach().clone() if bn.affine else None, "eps": bn.eps,
        }
        fuse_conv_bn(model.get_submodule(conv_name), bn)
        set_submodule(model, bn_name, nn.Identity())
    object.__setattr__(model, "quantplug_bn_stats", stats)
    logger.debug("folded %d batch-norm layers", len(pairs))
    return model
