"""Straight-through estimators for training latent weights through a sign or a ternary threshold.

Forward: the discrete value; backward: the identity (BinaryConnect, Courbariaux et al. 2015, sec. 2.3;
XNOR-Net, Rastegari et al. 2016, sec. 3.1). No gradient clipping: the latent weights start from a trained
network, whose large weights are the ones that should keep their sign.
"""

from __future__ import annotations

import torch

__all__ = ["sign_ste", "ternary_ste"]


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``x >= 0``, else ``-1``; gradient passed straight through."""
    hard = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    return x + (hard - x).detach()


def ternary_ste(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` where ``|x| > threshold`` (broadcast), else 0; gradient passed straight through."""
    hard = (torch.sign(x) * (x.abs() > threshold)).to(x.dtype)
    return x + (hard - x).detach()
