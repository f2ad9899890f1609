"""MRECG: "Solving Oscillation Problem in Post-Training Quantization Through a Theoretical Perspective".

Ma, Li, Zheng, Xiao, Wang, Wen, Pan, Chao, Ji, CVPR 2023 (arXiv 2303.11906); released code bytedance/MRECG
(on MQBench), which ships only the resulting schemes, not the search.

Mixed reconstruction granularity: adjacent blocks whose module capacities differ a lot are reconstructed
together. With ``CM_l`` the capacity of block ``l`` and ``m_l = 1`` meaning "block l is reconstructed together
with block l + 1", the scheduler solves exactly

    max_m  sum_l (CM_l - CM_{l+1})^2 m_l  -  lambda * (sum_l m_l - k)^2

i.e. it merges the ``k`` pairs with the largest squared capacity differences (more when a pair's difference
outweighs the penalty). This is the paper's ``argmin_m sum_l (CM_l - CM_{l+1})^2 m_l + lambda (m . 1 - k)^2``
read with ``m_l = 1`` marking a boundary that is *kept*: substituting ``m -> 1 - m`` turns one into the other
(with ``k -> L - 1 - k``), and only this reading selects the top-k differentials the paper describes.

Merges of consecutive pairs chain into groups of three or more blocks (MobileNetV2's published ``(7, 7, 7)``);
``max_group`` (3, the largest group the released code can build) bounds a group's size, which makes the
objective non-separable: the solver is a dynamic programme over (pairs, merges so far, current run length) and
returns the exact optimum.
"""

from __future__ import annotations

import ast
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from quantplug import hookimpl
from quantplug.errors import ConfigError
from quantplug.interfaces import GranularityScheduler, ReconUnit, UnitSpec
from quantplug.recipes import RecipeSpec

__all__ = [
    "CAPACITIES",
    "MRECG",
    "MRECGScheduler",
    "SCHEMES",
    "Scheme",
    "block_param_counts",
    "capacities",
    "default_k",
    "groups_from_mask",
    "objective",
    "parse_scheme",
    "solve",
]

logger = logging.getLogger(__name__)

CAPACITIES = ("params", "params_norm", "layers")


# ----------------------------------------------------------------------------------------- capacity
def block_param_counts(model: nn.Module, blocks: Sequence[UnitSpec]) -> list[int]:
    """Number of weights of the quantizable layers of each block (biases excluded: they stay in full precision)."""
    counts = []
    for block in blocks:
        total = 0
        for name in block.layers:
            weight = getattr(model.get_submodule(name), "weight", None)
            total += int(weight.numel()) if weight is not None else 0
        counts.append(total)
    return counts


def capacities(blocks: Sequence[UnitSpec], kind: str, param_counts: Sequence[int] | None = None) -> list[float]:
    """Module capacity ``CM_l`` of every block (blocks without layers get 0; they are never merged).

    * ``params``: ``log(P_l)``, ``P_l`` the number of quantized weights of block ``l`` (default). The log makes the
      squared difference depend on the *ratio* of neighbouring capacities, so a 4x drop counts the same in the
      first stage as in the last, instead of the last stage's millions of weights dominating every difference.
    * ``params_norm``: ``P_l / sum(P)``, the block's share of the network's quantized weights.
    * ``layers``: the number of quantized layers (needs no model; a coarse stand-in).
    """
    if kind not in CAPACITIES:
        raise ConfigError(f"mrecg capacity must be one of {', '.join(CAPACITIES)}; got {kind!r}")
    if kind == "layers":
        return [float(len(b.layers)) for b in blocks]
    if param_counts is None or len(param_counts) != len(blocks):
        raise ConfigError(f"mrecg capacity {kind!r} needs one parameter count per block")
    if kind == "params":
        return [math.log(p) if p > 0 else 0.0 for p in param_counts]
    total = float(sum(param_counts)) or 1.0
    return [p / total for p in param_counts]


# ----------------------------------------------------------------------------------------- solver
def objective(mask: Sequence[int], diffs: Sequence[float], k: int, lam: float) -> float:
    """``sum_l d_l m_l - lambda * (sum_l m_l - k)^2`` (the value the solver maximizes)."""
    merges = sum(mask)
    return sum(d for d, m in zip(diffs, mask) if m) - lam * (merges - k) ** 2


def _longest_run(mask: Sequence[int]) -> int:
    best = run = 0
    for m in mask:
        run = run + 1 if m else 0
        best = max(best, run)
    return best


def feasible(mask: Sequence[int], allowed: Sequence[bool], max_group: int | None) -> bool:
    """Whether ``mask`` merges only allowed pairs and builds no group larger than ``max_group`` blocks."""
    if any(m and not a for m, a in zip(mask, allowed)):
        return False
    return max_group is None or _longest_run(mask) <= max_group - 1


def solve(
    diffs: Sequence[float],
    k: int,
    lam: float,
    allowed: Sequence[bool] | None = None,
    max_group: int | None = 3,
) -> list[int]:
    """The exact maximizer of ``objective`` over feasible binary masks (see ``feasible``).

    Dynamic programme over the pairs in order with state (merges so far ``j``, length ``r`` of the run of merges
    ending at the current pair): ``best[j][r]`` is the largest ``sum d_l m_l``. The penalty depends on ``j``
    only, so the answer is the best final state of the ``j`` maximizing ``S(j) - lambda (j - k)^2``. Ties go to
    the ``j`` closest to ``k``, then to fewer merges, then to not merging earlier pairs.
    """
    n = len(diffs)
    allowed = [True] * n if allowed is None else list(allowed)
    if len(allowed) != n:
        raise ValueError("allowed must have one entry per pair")
    if lam < 0 or k < 0:
        raise ConfigError("mrecg needs lambda >= 0 and k >= 0")
    max_run = n if max_group is None else max_group - 1
    if max_run < 0:
        raise ConfigError("mrecg max_group must be at least 1")
    neg = -math.inf
    # best[(j, r)] = (value, backpointer index into history)
    layer: dict[tuple[int, int], float] = {(0, 0): 0.0}
    history: list[dict[tuple[int, int], tuple[int, int, int]]] = []
    for i in range(n):
        nxt: dict[tuple[int, int], float] = {}
        back: dict[tuple[int, int], tuple[int, int, int]] = {}
        for (j, r), value in sorted(layer.items()):
            # no merge at pair i
            key = (j, 0)
            if value > nxt.get(key, neg):
                nxt[key], back[key] = value, (j, r, 0)
            # merge pair i
            if allowed[i] and r + 1 <= max_run:
                key = (j + 1, r + 1)
                cand = value + float(diffs[i])
                if cand > nxt.get(key, neg):
                    nxt[key], back[key] = cand, (j, r, 1)
        layer = nxt
        history.append(back)
    best_key, best_score = (0, 0), neg
    for (j, r), value in sorted(layer.items(), key=lambda item: (abs(item[0][0] - k), item[0][0], item[0][1])):
        score = value - lam * (j - k) ** 2
        if score > best_score + 1e-12:
            best_key, best_score = (j, r), score
    mask = [0] * n
    j, r = best_key
    for i in range(n - 1, -1, -1):
        pj, pr, choice = history[i][(j, r)]
        mask[i] = choice
        j, r = pj, pr
    return mask


def groups_from_mask(n_blocks: int, mask: Sequence[int]) -> list[list[int]]:
    """Block indices grouped by a merge mask over the ``n_blocks - 1`` adjacent pairs."""
    groups: list[list[int]] = [[0]] if n_blocks else []
    for i in range(1, n_blocks):
        if mask[i - 1]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def default_k(n_candidates: int) -> int:
    """A quarter of the mergeable pairs, rounded half up, at least 1 when there is any pair.

    Matches the published schemes' merge counts for ResNet-18 (2 of 7), ResNet-50 (4 of 15) and RegNetX-600MF
    (4 of 15) with stem and head fixed; MobileNetV2's published scheme merges more (7 of 16; pass ``k=7``).
    """
    return max(1, int(n_candidates / 4 + 0.5)) if n_candidates else 0


# ----------------------------------------------------------------------------------------- published schemes
def _resnet_names(depths: Sequence[int]) -> tuple[str, ...]:
    names = ["stem"]
    for stage, depth in enumerate(depths, start=1):
        names += [f"layer{stage}.{i}" for i in range(depth)]
    return (*names, "head")


def _regnet_names(depths: Sequence[int]) -> tuple[str, ...]:
    names = ["stem"]
    for stage, depth in enumerate(depths, start=1):
        names += [f"trunk_output.block{stage}.block{stage}-{i}" for i in range(depth)]
    return (*names, "head")


@dataclass(frozen=True)
class Scheme:
    """A published MRECG scheme and its mapping onto the block names quantplug's torchvision adapter produces.

    ``published`` is the released config's string. In the released code (``MRECG.py``, ``extract_block``) each
    entry is one reconstruction unit in forward order: an int is a unit of one base block, a tuple of length
    ``n`` a unit of ``n`` consecutive base blocks; the numbers themselves are only labels (the code reads the
    type and the length). ``sizes`` are the unit sizes counted in quantplug's blocks (``blocks``).
    """

    published: str
    sizes: tuple[int, ...]
    blocks: tuple[str, ...]
    model: str

    def groups(self) -> list[tuple[str, ...]]:
        out, start = [], 0
        for size in self.sizes:
            out.append(self.blocks[start:start + size])
            start += size
        return out


SCHEMES: dict[str, Scheme] = {
    "resnet18": Scheme("[1, 2, (3, 3), (4, 4), 5, 6, 7, 8]", (1, 1, 2, 2, 1, 1, 1, 1),
                       _resnet_names((2, 2, 2, 2)), "torchvision resnet18"),
    "resnet50": Scheme("[1, 2, 3, (4, 4), 5, 6, (7, 7, 7), 8, 9, 10, (11, 11), 12, 13, 14]",
                       (1, 1, 1, 2, 1, 1, 3, 1, 1, 1, 2, 1, 1, 1), _resnet_names((3, 4, 6, 3)), "torchvision resnet50"),
    # MQBench's block extraction stacks features.0 and features.1 (no shortcut, three layers) into its first unit,
    # so the published first entry covers two of quantplug's blocks (stem, features.1)
    "mobilenetv2": Scheme("[1, 2, (3, 3), 4, (5, 5), 6, (7, 7, 7), (8, 8, 8), 9, (10, 10), 11]",
                          (2, 1, 2, 1, 2, 1, 3, 3, 1, 2, 1),
                          ("stem", *(f"features.{i}" for i in range(1, 18)), "head"), "torchvision mobilenet_v2"),
    "regnetx600m": Scheme("[1, 2, 3, 4, (5, 5, 5), 6, 7, (8, 8), 9, 10, 11, 12, (13, 13), 14]",
                          (1, 1, 1, 1, 3, 1, 1, 2, 1, 1, 1, 1, 2, 1), _regnet_names((1, 3, 5, 7)),
                          "RegNetX-600MF (pycls depths 1, 3, 5, 7; not shipped by torchvision)"),
}

_ALIASES = {"r18": "resnet18", "r50": "resnet50", "mbv2": "mobilenetv2", "reg600": "regnetx600m",
            "regnetx600mf": "regnetx600m"}


def _normalize(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    return _ALIASES.get(key, key)


def parse_scheme(value: Any) -> list[int]:
    """Unit sizes from an explicit scheme: ``"[1, 2, (3, 3)]"`` (the released configs' form) or ``[1, 2, [3, 3]]``."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise ConfigError(f"cannot read mrecg scheme {value!r}: {exc}") from exc
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"an mrecg scheme is a non-empty list of ints and tuples, got {value!r}")
    sizes = []
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, (int, list, tuple)) or entry in ((), []):
            raise ConfigError(f"mrecg scheme entries are ints or non-empty tuples, got {entry!r}")
        sizes.append(1 if isinstance(entry, int) else len(entry))
    return sizes


# ----------------------------------------------------------------------------------------- scheduler
class MRECGScheduler(GranularityScheduler):
    """MRECG (Ma et al., CVPR 2023): merge adjacent blocks with large module-capacity differences (mixed granularity).

    ``scheme``: ``""`` searches (exact solver, see the module docstring); a published scheme by name
    (``resnet18``, ``resnet50``, ``mobilenetv2``, ``regnetx600m``); ``auto`` uses the published scheme whose block
    names match the model and searches otherwise; or an explicit list of unit sizes in the released configs'
    form, ``"[1, 2, (3, 3), ...]"`` (one entry per unit, covering the adapter's blocks in order).
    ``capacity``: ``params`` (log weight count, default), ``params_norm`` or ``layers``; ``capacities`` gives one
    value per block instead. ``k``: merges wanted (default a quarter of the mergeable pairs); ``lam``: lambda
    (``lambda`` is a Python keyword); ``max_group``: largest unit in blocks (0: unbounded); ``fixed_ends``: never
    merge the first and the last block holding layers (the stem and head, 8-bit by the bit policy).
    """

    name = "mrecg"

    @dataclass(frozen=True)
    class Config:
        scheme: Any = ""
        k: int | None = None
        lam: float = 1.0
        capacity: str = "params"
        capacities: tuple = ()
        max_group: int = 3
        fixed_ends: bool = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        c = self.config
        if c.capacity not in CAPACITIES:
            raise ConfigError(f"mrecg capacity must be one of {', '.join(CAPACITIES)}; got {c.capacity!r}")
        if not (isinstance(c.lam, (int, float)) and math.isfinite(c.lam) and c.lam >= 0):
            raise ConfigError(f"mrecg lam (lambda) must be a finite number >= 0; got {c.lam!r}")
        if c.k is not None and (isinstance(c.k, bool) or not isinstance(c.k, int) or c.k < 0):
            raise ConfigError(f"mrecg k must be a non-negative integer; got {c.k!r}")
        if isinstance(c.max_group, bool) or not isinstance(c.max_group, int) or c.max_group < 0 or c.max_group == 1:
            raise ConfigError(f"mrecg max_group must be 0 (unbounded) or at least 2; got {c.max_group!r}")
        if not isinstance(c.scheme, str) or c.scheme.lstrip().startswith("["):
            parse_scheme(c.scheme)
        elif c.scheme not in ("", "auto") and _normalize(c.scheme) not in SCHEMES:
            raise ConfigError(f"unknown mrecg scheme {c.scheme!r}; published schemes: {', '.join(SCHEMES)} "
                              "(or 'auto', '' to search, or an explicit list such as '[1, (2, 2), 3]')")
        self._model: nn.Module | None = None
        self.last_capacities: list[float] = []

    def bind(self, model: nn.Module) -> None:
        """Give the scheduler the (BN-folded, full-precision) model before ``plan``: ``capacity=params`` counts its
        weights. Without it the parameter-based capacities fall back to ``layers`` (with a warning)."""
        self._model = model

    # ------------------------------------------------------------------ plan
    def plan(self, blocks: Sequence[UnitSpec]) -> list[ReconUnit]:
        scheme = self.config.scheme
        if isinstance(scheme, str) and scheme == "auto":
            names = tuple(b.name for b in blocks)
            match = next((key for key, s in SCHEMES.items() if s.blocks == names), None)
            if match is not None:
                logger.info("mrecg: blocks match the published %s scheme %s", match, SCHEMES[match].published)
                return self._units(blocks, list(SCHEMES[match].sizes))
            logger.info("mrecg: no published scheme matches these %d blocks; searching", len(blocks))
            return self._search(blocks)
        if isinstance(scheme, str) and not scheme:
            return self._search(blocks)
        if isinstance(scheme, str) and not scheme.lstrip().startswith("["):
            key = _normalize(scheme)
            known = SCHEMES[key]
            names = tuple(b.name for b in blocks)
            if len(names) != len(known.blocks):
                raise ConfigError(
                    f"mrecg scheme {key!r} is for {known.model}: {len(known.blocks)} blocks "
                    f"({', '.join(known.blocks)}); this model has {len(names)} ({', '.join(names)})")
            if names != known.blocks:
                logger.warning("mrecg scheme %s expects blocks %s; applying it by position to %s",
                               key, known.blocks, names)
            return self._units(blocks, list(known.sizes))
        return self._units(blocks, parse_scheme(scheme))

    def _units(self, blocks: Sequence[UnitSpec], sizes: Sequence[int]) -> list[ReconUnit]:
        if sum(sizes) != len(blocks):
            raise ConfigError(
                f"mrecg scheme covers {sum(sizes)} blocks but the model has {len(blocks)}: "
                f"{', '.join(b.name for b in blocks)}")
        units, start = [], 0
        for size in sizes:
            group = blocks[start:start + size]
            start += size
            if any(b.layers for b in group):
                names = tuple(b.name for b in group)
                units.append(ReconUnit("+".join(names), blocks=names))
        return units

    def block_capacities(self, blocks: Sequence[UnitSpec]) -> list[float]:
        c = self.config
        if c.capacities:
            values = [float(v) for v in c.capacities]
            with_layers = [i for i, b in enumerate(blocks) if b.layers]
            if len(values) == len(blocks):
                return values
            if len(values) == len(with_layers):
                out = [0.0] * len(blocks)
                for i, v in zip(with_layers, values):
                    out[i] = v
                return out
            raise ConfigError(f"mrecg capacities: give one value per block ({len(blocks)}) or per block with "
                              f"layers ({len(with_layers)}); got {len(values)}")
        kind = c.capacity
        if kind == "layers":
            return capacities(blocks, kind)
        if self._model is None:
            logger.warning(
                "mrecg: capacity=%s needs the model's weight counts, but this quantplug did not pass the model to "
                "the scheduler (GranularityScheduler.bind); using capacity=layers. Pass capacities=[...] or a "
                "published scheme to avoid the fallback.", kind)
            return capacities(blocks, "layers")
        return capacities(blocks, kind, block_param_counts(self._model, blocks))

    def _search(self, blocks: Sequence[UnitSpec]) -> list[ReconUnit]:
        c = self.config
        cm = self.block_capacities(blocks)
        self.last_capacities = cm
        with_layers = [i for i, b in enumerate(blocks) if b.layers]
        first, last = (with_layers[0], with_layers[-1]) if with_layers else (-1, -1)
        allowed = []
        for i in range(len(blocks) - 1):
            ok = bool(blocks[i].layers) and bool(blocks[i + 1].layers)
            if c.fixed_ends and (i == first or i + 1 == last):
                ok = False
            allowed.append(ok)
        diffs = [(cm[i] - cm[i + 1]) ** 2 for i in range(len(blocks) - 1)]
        k = default_k(sum(allowed)) if c.k is None else c.k
        mask = solve(diffs, k, c.lam, allowed, c.max_group or None)
        groups = groups_from_mask(len(blocks), mask)
        logger.info("mrecg: capacities %s; k=%d, lambda=%g; merged %s", [round(v, 3) for v in cm], k, c.lam,
                    [[blocks[i].name for i in g] for g in groups if len(g) > 1])
        return self._units(blocks, [len(g) for g in groups])


# ----------------------------------------------------------------------------------------- recipe
#: the released configs: cali_batchsize 16 x data batch 256 = 4 096 images, each step one cached batch of 256
OFFICIAL = {"calib.num_samples": 4096, "recon.batch_size": 256, "recon.iters": 20000}

MRECG = RecipeSpec(
    name="mrecg",
    extends="brecq",
    description="MRECG: adjacent blocks with large capacity differences reconstructed together (a scheduler on top "
    "of BRECQ, or of QDrop with --base qdrop)",
    overrides={"scheduler": {"name": "mrecg", "options": {"scheme": "auto"}}},
    presets={
        "official": OFFICIAL,
        "official-resnet18": {**OFFICIAL, "scheduler.options.scheme": "resnet18"},
        "official-resnet50": {**OFFICIAL, "scheduler.options.scheme": "resnet50"},
        "official-mobilenetv2": {**OFFICIAL, "scheduler.options.scheme": "mobilenetv2",
                                 "rounding.options.reg_weight": 0.1},
        "official-regnetx600m": {**OFFICIAL, "scheduler.options.scheme": "regnetx600m"},
        "search": {"scheduler.options.scheme": ""},
        "cpu-fast": {"recon.iters": 2000, "recon.act_iters": 500, "calib.num_samples": 512},
    },
    source="Ma et al., 'Solving Oscillation Problem in Post-Training Quantization Through a Theoretical "
    "Perspective', CVPR 2023 (code: bytedance/MRECG)",
)


@hookimpl
def register_schedulers(register) -> None:  # type: ignore[no-untyped-def]
    register(MRECGScheduler)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(MRECG)
