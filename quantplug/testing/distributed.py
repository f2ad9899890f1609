"""Run :func:`quantplug.apply` data-parallel in local CPU processes (gloo), for tests of components and recipes.

A component that keeps global state, draws different random numbers on different ranks for something every rank
must agree on, or updates a parameter outside its gradient breaks data-parallel reconstruction: the ranks' models
drift apart. ``run_data_parallel`` makes that visible::

    ranks = run_data_parallel(tmp_path, plugin="my-rounding", model_id="testing:tiny-resnet",
                              overrides={"recon.iters": 20, "calib.num_samples": 32})
    assert_ranks_agree(ranks)
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class RankResult:
    """What one rank's ``apply`` returned."""

    rank: int
    state: dict[str, torch.Tensor]
    records: list[dict[str, Any]]
    quant_metrics: dict[str, float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, kwargs: Mapping[str, Any], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), QUANTPLUG_PROGRESS="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=10))
    try:
        from quantplug.api import apply

        result = apply(**kwargs)
        assert result.model is not None
        torch.save({"state": result.model.state_dict(), "records": [asdict(r) for r in result.records],
                    "quant_metrics": result.quant_metrics}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_data_parallel(workdir: str | Path, world_size: int = 2, **apply_kwargs: Any) -> list[RankResult]:
    """``quantplug.apply(**apply_kwargs)`` in ``world_size`` processes of one gloo group; each rank's result."""
    out = Path(workdir) / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world_size, free_port(), apply_kwargs, str(out)), nprocs=world_size, join=True)
    results = []
    for rank in range(world_size):
        data = torch.load(out / f"rank{rank}.pt", weights_only=False)
        results.append(RankResult(rank, data["state"], data["records"], data["quant_metrics"]))
    return results


def assert_ranks_agree(ranks: Sequence[RankResult]) -> None:
    """Every rank ends with the same model and reports the same unit losses."""
    first = ranks[0]
    for other in ranks[1:]:
        assert other.state.keys() == first.state.keys()
        differ = [k for k, v in first.state.items() if not torch.equal(v, other.state[k])]
        assert not differ, f"rank {other.rank} ended with other values than rank 0 for {differ[:5]}"
        assert _untimed(other.records) == _untimed(first.records), (
            f"rank {other.rank} reports other unit losses than rank 0")


#: what a unit record measures of the machine, not of the reconstruction: differs between ranks
TIMING_FIELDS = ("seconds", "cpu_seconds")


def _untimed(records: Sequence[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]
