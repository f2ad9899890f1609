"""Train the tiny models' shipped weights: ``python -m quantplug.testing.train_tiny`` (about a minute on a CPU).

Deterministic (fixed seeds, one thread); writes ``quantplug/data/tiny-*.safetensors`` atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from safetensors.torch import save_file
from torch import nn

from quantplug.testing import data, models

logger = logging.getLogger("quantplug.train_tiny")


def _train(model: nn.Module, dataset: torch.utils.data.TensorDataset, epochs: int, lr: float, lm: bool) -> None:
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            out = model(x)
            loss = nn.functional.cross_entropy(out.flatten(0, 1), y.flatten()) if lm else \
                nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _save(model: nn.Module, path: str) -> None:
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    t0 = time.time()
    cnn = models.tiny_resnet(0)
    _train(cnn, data.synthetic_images(8192, "train", 0), epochs=8, lr=3e-3, lm=False)
    test = data.synthetic_images(1000, "test", 0)
    with torch.no_grad():
        acc = (cnn(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item() * 100
    logger.info("tiny-resnet test top-1 %.2f%%", acc)
    _save(cnn, os.path.join(args.out, "tiny-resnet.safetensors"))
    dec = models.tiny_decoder(0)
    _train(dec, data.synthetic_tokens(4096, "train", 0), epochs=6, lr=3e-3, lm=True)
    test_t = data.synthetic_tokens(500, "test", 0)
    with torch.no_grad():
        out = dec(test_t.tensors[0])
        ppl = torch.exp(nn.functional.cross_entropy(out.flatten(0, 1), test_t.tensors[1].flatten())).item()
    logger.info("tiny-decoder test perplexity %.2f", ppl)
    _save(dec, os.path.join(args.out, "tiny-decoder.safetensors"))
    logger.info("done in %.1fs", time.time() - t0)


if __name__ == "__main__":
    main()
