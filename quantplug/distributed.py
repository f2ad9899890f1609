"""Data-parallel reconstruction over ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

Launch with torchrun (``torchrun --nproc-per-node 2 -m quantplug apply ...``), with any launcher that sets
``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``, or call :func:`quantplug.apply` from processes
whose default process group is already initialized. What is shared and what is split:

* every rank loads the model and the whole calibration set; observers and model passes see every sample, so
  quantizer initialization is the same on every rank and the same as in a single-process run;
* a unit's input / output caches hold only the rank's shard of the calibration samples (samples ``rank``,
  ``rank + world``, ...): cache memory per process divides by the number of processes;
* each reconstruction step draws ``ceil(batch_size / world)`` samples from the rank's shard, so the step's
  global batch is the recipe's; the gradients of the unit's rounding and step-size parameters are averaged over
  the ranks before the optimizer step, so every rank holds the same parameters after every step;
* unit losses before / after are averaged over all samples of all ranks;
* only rank 0 writes (checkpoints, the saved run), evaluates, and shows progress bars.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from quantplug.errors import ConfigError

logger = logging.getLogger(__name__)

#: how long a rank waits for the others at a collective (evaluation on rank 0 happens after the last one)
TIMEOUT = datetime.timedelta(hours=2)


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialized default process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


def init_from_environment(device: torch.device) -> torch.device:
    """Join the process group a launcher described in the environment (``WORLD_SIZE`` > 1); return the device
    this rank uses (``cuda`` without an index becomes ``cuda:LOCAL_RANK``). A no-op for a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: launch with "
                          "`torchrun --nproc-per-node N -m quantplug apply ...`")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    logger.info("rank %d of %d (%s backend) on %s", dist.get_rank(), size, backend, device)
    return device


def shutdown() -> None:
    """Leave the process group (if this process is in one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_indices(num: int) -> range:
    """This rank's calibration samples of ``num``: ``rank, rank + world, ...``."""
    rank, size = world()
    if num < size:
        raise ConfigError(f"{num} calibration samples cannot be shared by {size} processes; "
                          "use more samples or fewer processes")
    return range(rank, num, size)


def batch_per_rank(batch_size: int) -> int:
    """Samples each rank draws per step so that the step's global batch is ``batch_size``."""
    return math.ceil(batch_size / world()[1])


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks in one collective (a missing gradient counts as 0)."""
    size = world()[1]
    if size == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for p, g in zip(params, grads):
        chunk = flat[offset : offset + g.numel()].view_as(g)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += g.numel()


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if world()[1] == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (so that all ranks stop together)."""
    return sum_over_ranks([1.0 if flag else 0.0], device)[0] > 0
