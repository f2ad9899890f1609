"""Why the Hessian traces are estimated block by block: relative standard error of Hutchinson per layer.

    OMP_NUM_THREADS=1 python plugins/quantplug-mixed/trace_noise.py zoo:resnet18-fmnist --data fmnist \\
        --samples 64 --probes 20 --out plugins/quantplug-mixed/results/trace-noise-resnet18.md

On one batch of calibration images, ``--probes`` Rademacher probes ``z`` estimate each layer's ``Tr(H_ii)`` two ways:
``global`` (one ``z`` over all layers, one Hessian-vector product per probe, ``z_i^T (H z)_i``) and ``block``
(``z_i^T H_ii z_i``, one double backward per layer per probe, what the ``mixed`` pass does). The table gives the mean
trace per weight and the relative standard error of each.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence

import torch
from quantplug_mixed.sensitivity import _with_grad

from quantplug.plugins import Session


def _stats(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean, stderr / abs(mean) if mean else math.inf


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", default=None)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    session = Session()
    adapter = session.adapter_for(args.model)
    model = adapter.fold_batchnorm(adapter.load(args.model, device=torch.device("cpu")).eval())
    data = args.data or adapter.default_data(args.model)
    dataset = session.data_source_for(data).load(data, "train", num_samples=args.samples, seed=args.seed)
    x, y = adapter.prepare_batch(next(iter(torch.utils.data.DataLoader(dataset, batch_size=args.samples))),
                                 torch.device("cpu"))
    names = adapter.quantizable_layers(model)
    work, params = _with_grad(model, names)
    generator = torch.Generator().manual_seed(args.seed)
    global_values: list[list[float]] = [[] for _ in params]
    block_values: list[list[float]] = [[] for _ in params]
    seconds = {"global": 0.0, "block": 0.0}
    for _ in range(args.probes):
        start = time.perf_counter()
        zs = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype) for p in params]
        grads = torch.autograd.grad(adapter.task_loss(adapter.forward(work, x), y), params, create_graph=True)
        hz = torch.autograd.grad(grads, params, grad_outputs=zs)
        for values, z, h in zip(global_values, zs, hz):
            values.append(float((z * h).sum()))
        seconds["global"] += time.perf_counter() - start
        start = time.perf_counter()
        grads = torch.autograd.grad(adapter.task_loss(adapter.forward(work, x), y), params, create_graph=True)
        for values, p, g in zip(block_values, params, grads):
            z = (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype)
            (h,) = torch.autograd.grad(g, p, grad_outputs=z, retain_graph=True)
            values.append(float((z * h).sum()))
        seconds["block"] += time.perf_counter() - start
    lines = [f"`{args.model}`, {args.samples} calibration images, {args.probes} probes per layer; seconds per probe: "
             f"global {seconds['global'] / args.probes:.2f}, block {seconds['block'] / args.probes:.2f} "
             f"(load {os.getloadavg()[0]:.1f})", "",
             "| layer | weights | global Tr/n | global rel. s.e. | block Tr/n | block rel. s.e. |",
             "|---|---|---|---|---|---|"]
    for name, p, gv, bv in zip(names, params, global_values, block_values):
        (gm, gse), (bm, bse) = _stats(gv), _stats(bv)
        lines.append(f"| {name} | {p.numel()} | {gm / p.numel():.3e} | {gse:.2f} | {bm / p.numel():.3e} | {bse:.2f} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
