#!/usr/bin/env python
"""Train the quantplug-torchvision model zoo on Fashion-MNIST, reproducibly, on CPU.

The models are torchvision's own, unmodified architecture definitions (``torchvision.models.<arch>(num_classes=10)``);
only the input size is chosen here. Grey images are replicated to 3 channels (see
:func:`quantplug_torchvision.fashion_mnist.preprocess`).

Recipe (identical for every arch unless overridden on the command line):

* data: the 60 000 training images, preprocessed once (pad 28 -> 32, resize to ``--size``, normalize with the
  training mean/std); the 10 000 test images are used for evaluation only (the final-epoch weights are kept,
  there is no model selection on the test set).
* augmentation: random crop with padding ``size // 8`` (pad value = normalized black background) and random
  horizontal flip, drawn from a per-epoch ``torch.Generator`` seeded with ``seed * 1000 + epoch``, which also
  draws the per-epoch data order -- so a resumed run sees exactly the same batches.
* optimizer: SGD, momentum 0.9, Nesterov, weight decay ``--wd`` (not applied to BN / bias parameters),
  batch size ``--batch-size``, cross entropy with label smoothing ``--label-smoothing``.
* schedule: one-cycle, stepped per iteration: cosine-shaped warm-up from ``lr/25`` to ``--lr`` over the first
  ``--warmup`` fraction of all iterations, then cosine annealing to ``lr/25/1e4``
  (``torch.optim.lr_scheduler.OneCycleLR``, ``anneal_strategy="cos"``, ``three_phase=False``, momentum fixed).

Outputs (written atomically: temp file in the same directory, then ``os.replace``):

* ``<out>/<arch>-fmnist.safetensors``: the final state dict (weights + BN running stats) cast to fp16
  (``num_batches_tracked`` stays int64);
* ``<out>/<arch>-fmnist.json``: metadata incl. fp32 test top-1 and the top-1 of exactly the committed fp16
  weights (cast fp32 -> fp16 -> fp32 and evaluated).

A checkpoint is written after every epoch (``--checkpoint``, default ``<out>/<arch>-fmnist.ckpt``) and deleted
when training finishes; ``--resume`` continues from it.

Example::

    python zoo/train_zoo.py --arch resnet18 --size 32 --epochs 18 --threads 1 \
        --out src/quantplug_torchvision/zoo
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

try:
    from quantplug_torchvision.fashion_mnist import MEAN, STD, load_fashion_mnist, preprocess
except ImportError:  # running from a source checkout without installing the adapter
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from quantplug_torchvision.fashion_mnist import MEAN, STD, load_fashion_mnist, preprocess

log = logging.getLogger("train_zoo")

ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "shufflenet_v2_x1_0",
    "efficientnet_b0",
    "regnet_x_400mf",
)

# Archs with many depthwise convolutions run much faster in channels_last on CPU (measured ~1.7x for
# mobilenet_v2). The memory format does not change the model or its saved weights.
CHANNELS_LAST = {"mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--size", type=int, default=32, help="model input size (square); 28x28 is padded to 32 first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/quantplug_torchvision/zoo")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay (conv/linear weights only)")
    p.add_argument("--warmup", type=float, default=0.15, help="fraction of iterations spent warming up")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--no-augment", action="store_true", help="disable random crop + flip")
    p.add_argument("--limit-train", type=int, default=0, help="use only the first N (shuffled) training images")
    p.add_argument("--max-iters", type=int, default=0, help="stop each epoch after N iterations (timing pilots)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST root (else $QUANTPLUG_FASHION_MNIST, ...)")
    p.add_argument("--checkpoint", type=Path, default=None, help="per-epoch checkpoint (default <out>/<arch>.ckpt)")
    p.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists")
    p.add_argument("--log-file", type=Path, default=None, help="also append the log to this file")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- helpers


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    def _w(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
            fh.write("\n")

    atomic_write_bytes(path, _w)


def build_model(arch: str) -> torch.nn.Module:
    return getattr(torchvision.models, arch)(num_classes=10)


def param_groups(model: torch.nn.Module, wd: float):
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def augment(x: torch.Tensor, gen: torch.Generator, pad: int, fill: float) -> torch.Tensor:
    """Random crop with ``pad`` pixels of padding (value ``fill``) + random horizontal flip. x: [B, 1, S, S]."""
    b, _c, s, _ = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), value=fill)
        offs = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
        out = torch.empty_like(x)
        for i in range(b):
            dy, dx = int(offs[i, 0]), int(offs[i, 1])
            out[i] = xp[i, :, dy : dy + s, dx : dx + s]
        x = out
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def to_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x.expand(-1, 3, -1, -1)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, channels_last: bool, bs: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], bs):
        logits = model(to_input(x[i : i + bs], channels_last))
        correct += int((logits.argmax(1) == y[i : i + bs]).sum())
    return correct / x.shape[0]


def fp16_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(torch.float16)
        sd[k] = v.contiguous()
    return sd


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.log_file:
        args.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(args.log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    out: Path = args.out
    stem = f"{args.arch}-fmnist"
    ckpt_path: Path = args.checkpoint or (out / f"{stem}.ckpt")
    channels_last = args.arch in CHANNELS_LAST
    log.info("args: %s", vars(args))
    log.info("torch %s, torchvision %s, threads %d, channels_last %s", torch.__version__, torchvision.__version__,
             torch.get_num_threads(), channels_last)

    # ---- data (preprocessed once, 1 channel; expanded to 3 per batch)
    t0 = time.time()
    xtr_u8, ytr_np = load_fashion_mnist("train", args.data_root)
    xte_u8, yte_np = load_fashion_mnist("test", args.data_root)
    xtr = preprocess(xtr_u8, args.size, channels=1)
    xte = preprocess(xte_u8, args.size, channels=1)
    ytr, yte = torch.from_numpy(ytr_np), torch.from_numpy(yte_np)
    if args.limit_train:
        sel = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(args.seed))[: args.limit_train]
        xtr, ytr = xtr[sel], ytr[sel]
    n = xtr.shape[0]
    log.info("data: train %s test %s (%.1fs)", tuple(xtr.shape), tuple(xte.shape), time.time() - t0)
    fill = -MEAN / STD  # normalized value of the black background
    pad = 0 if args.no_augment else max(1, args.size // 8)

    # ---- model / optimizer / schedule
    torch.manual_seed(args.seed)
    model = build_model(args.arch)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = n // args.batch_size  # drop_last
    if args.max_iters:
        steps_per_epoch = min(steps_per_epoch, args.max_iters)
    total_steps = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(param_groups(model, args.wd), lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=total_steps, pct_start=args.warmup, anneal_strategy="cos",
        div_factor=25.0, final_div_factor=1e4, three_phase=False, cycle_momentum=False,
    )

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k in ("arch", "epochs", "size", "seed", "batch_size", "lr", "wd", "warmup", "label_smoothing",
                       "no_augment", "limit_train", "max_iters")}
    start_epoch, history, train_wall = 0, [], 0.0
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck["config"] != config:
            raise SystemExit(f"checkpoint {ckpt_path} was made with {ck['config']}, not {config}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"])
        start_epoch, history, train_wall = ck["epoch"], ck["history"], ck["train_wall_s"]
        log.info("resumed from %s at epoch %d (%.0fs of training so far)", ckpt_path, start_epoch, train_wall)
    elif args.resume:
        log.info("--resume given but %s does not exist: starting from scratch", ckpt_path)

    # ---- train
    for epoch in range(start_epoch, args.epochs):
        te = time.time()
        model.train()
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(n, generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for it in range(steps_per_epoch):
            idx = order[it * args.batch_size : (it + 1) * args.batch_size]
            xb, yb = xtr[idx], ytr[idx]
            if not args.no_augment:
                xb = augment(xb, gen, pad, fill)
            logits = model(to_input(xb, channels_last))
            loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if not math.isfinite(loss.item()):
                raise SystemExit(f"non-finite loss at epoch {epoch} iteration {it}")
            loss_sum += loss.item() * yb.shape[0]
            correct += int((logits.argmax(1) == yb).sum())
            seen += yb.shape[0]
            if it % 100 == 0:
                log.info("epoch %d it %d/%d loss %.4f lr %.4f (%.1f img/s)", epoch + 1, it, steps_per_epoch,
                         loss.item(), sched.get_last_lr()[0], seen / max(time.time() - te, 1e-9))
        epoch_train_s = time.time() - te
        train_wall += epoch_train_s
        test_acc = evaluate(model, xte, yte, channels_last)
        rec = {"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 5), "train_top1": round(correct / seen, 5),
               "test_top1_fp32": round(test_acc, 5), "epoch_train_s": round(epoch_train_s, 1),
               "eval_s": round(time.time() - te - epoch_train_s, 1)}
        history.append(rec)
        log.info("epoch %d/%d done: %s (training so far %.1f min)", epoch + 1, args.epochs, rec, train_wall / 60)
        ck = {"config": config, "model": model.state_dict(), "optimizer": opt.state_dict(),
              "scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch + 1,
              "history": history, "train_wall_s": train_wall}
        atomic_write_bytes(ckpt_path, lambda tmp, ck=ck: torch.save(ck, tmp))

    # ---- final evaluation: fp32, and exactly the fp16 weights that get written
    top1_fp32 = evaluate(model, xte, yte, channels_last)
    sd16 = fp16_state_dict(model)
    model16 = build_model(args.arch)
    model16.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in sd16.items()}, strict=True)
    if channels_last:
        model16 = model16.to(memory_format=torch.channels_last)
    top1_fp16 = evaluate(model16, xte, yte, channels_last)
    log.info("final test top-1: fp32 %.4f, fp16 weights %.4f", top1_fp32, top1_fp16)

    if args.limit_train or args.max_iters:
        log.warning("pilot run (--limit-train/--max-iters): do not commit these artifacts")

    from safetensors.torch import save_file

    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "arch": args.arch,
        "torchvision_constructor": f"torchvision.models.{args.arch}(num_classes=10)",
        "dataset": "Fashion-MNIST",
        "num_classes": 10,
        "input_size": [3, args.size, args.size],
        "preprocess": "quantplug_torchvision.fashion_mnist.preprocess(images, size): /255, zero-pad 28->32, "
        "bilinear resize to size (if != 32), (x-mean)/std, grey replicated to 3 channels",
        "normalization": {"mean": MEAN, "std": STD, "scale": "pixel/255", "channels": "grey replicated x3"},
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "steps_per_epoch": steps_per_epoch,
        "optimizer": {"name": "SGD", "momentum": 0.9, "nesterov": True, "weight_decay": args.wd,
                      "weight_decay_on": "conv/linear weights (ndim > 1); not BN/bias"},
        "schedule": {"name": "OneCycleLR", "per": "iteration", "max_lr": args.lr, "pct_start": args.warmup,
                     "anneal_strategy": "cos", "div_factor": 25.0, "final_div_factor": 1e4,
                     "total_steps": total_steps},
        "loss": {"name": "cross_entropy", "label_smoothing": args.label_smoothing},
        "augmentation": "none" if args.no_augment else f"random crop (pad {pad}, fill = background) + hflip",
        "train_images": n,
        "pilot": {"limit_train": args.limit_train, "max_iters": args.max_iters} if args.limit_train or args.max_iters
        else None,
        "test_images": int(xte.shape[0]),
        "test_top1_fp32": round(top1_fp32, 5),
        "test_top1_fp16_weights": round(top1_fp16, 5),
        "weights_dtype": "float16 (num_batches_tracked int64)",
        "num_parameters": n_params,
        "train_wall_time_s": round(train_wall, 1),
        "train_wall_time_min": round(train_wall / 60, 2),
        "threads": args.threads,
        "channels_last": channels_last,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "history": history,
        "command": "python zoo/train_zoo.py " + " ".join(sys.argv[1:]) if argv is None else " ".join(argv),
    }
    wpath = out / f"{stem}.safetensors"
    atomic_write_bytes(wpath, lambda tmp: save_file(sd16, tmp, metadata={"arch": args.arch, "dataset": "fmnist"}))
    atomic_write_json(out / f"{stem}.json", meta)
    log.info("wrote %s (%.2f MB) and %s", wpath, wpath.stat().st_size / 1e6, out / f"{stem}.json")
    if ckpt_path.exists():
        ckpt_path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
