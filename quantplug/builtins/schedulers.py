"""Built-in reconstruction-granularity schedulers: layer, block, stage, network, explicit groups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quantplug.errors import ConfigError
from quantplug.hookspecs import hookimpl
from quantplug.interfaces import GranularityScheduler, ReconUnit, UnitSpec


class LayerScheduler(GranularityScheduler):
    """Every quantized layer on its own, in forward order (AdaRound)."""

    name = "layer"

    def plan(self, blocks: Sequence[UnitSpec]) -> list[ReconUnit]:
        return [ReconUnit(layer, layer=layer) for b in blocks for layer in b.layers]


class BlockScheduler(GranularityScheduler):
    """Each block (residual block, transformer layer; stem and head as their own blocks) at once (BRECQ)."""

    name = "block"

    def plan(self, blocks: Sequence[UnitSpec]) -> list[ReconUnit]:
        return [ReconUnit(b.name, blocks=(b.name,)) for b in blocks if b.layers]


class StageScheduler(GranularityScheduler):
    """Consecutive blocks of the same stage together (BRECQ's stage-wise ablation)."""

    name = "stage"

    def plan(self, blocks: Sequence[UnitSpec]) -> list[ReconUnit]:
        units: list[list[UnitSpec]] = []
        for b in blocks:
            if units and b.stage and units[-1][-1].stage == b.stage:
                units[-1].append(b)
            else:
                units.append([b])
        return [
            ReconUnit(group[0].stage or group[0].name, blocks=tuple(x.name for x in group))
            for group in units
            if any(x.layers for x in group)
        ]


class NetworkScheduler(GranularityScheduler):
    """The whole network as one unit (NWQ's network-wise reconstruction)."""

    name = "network"

    def plan(self, blocks: Sequence[UnitSpec]) -> list[ReconUnit]:
        return [ReconUnit("network", blocks=tuple(b.name for b in blocks))]


class GroupScheduler(GranularityScheduler):
    """Explicit groups: each entry a block name, or a list of adjacent block names reconstructed together.

    Blocks not named in ``groups`` are reconstructed on their own, in order.
    """

    name = "groups"

    @dataclass(frozen=True)
    class Config:
        groups: tuple = ()

    def plan(self, blocks: Sequence[UnitSpec]) -> list[ReconUnit]:
        order = {b.name: i for i, b in enumerate(blocks)}
        grouped: dict[int, tuple[str, ...]] = {}
        covered: set[str] = set()
        for entry in self.config.groups:
            names = (entry,) if isinstance(entry, str) else tuple(entry)
            for n in names:
                if n not in order:
                    raise ConfigError(f"group {names} names unknown block {n!r}; blocks: {', '.join(order)}")
                if n in covered:
                    raise ConfigError(f"block {n!r} appears in two groups")
            idx = [order[n] for n in names]
            if idx != list(range(idx[0], idx[0] + len(idx))):
                raise ConfigError(f"group {names} must list adjacent blocks in forward order")
            grouped[idx[0]] = names
            covered.update(names)
        units, i = [], 0
        while i < len(blocks):
            if i in grouped:
                names = grouped[i]
                units.append(ReconUnit("+".join(names), blocks=names))
                i += len(names)
                continue
            if blocks[i].name not in covered and blocks[i].layers:
                units.append(ReconUnit(blocks[i].name, blocks=(blocks[i].name,)))
            i += 1
        return units


@hookimpl
def register_schedulers(register) -> None:  # type: ignore[no-untyped-def]
    for cls in (LayerScheduler, BlockScheduler, StageScheduler, NetworkScheduler, GroupScheduler):
        register(cls)
