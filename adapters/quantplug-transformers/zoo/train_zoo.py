"""Train the Austen language-model zoo: a small OPT and a small GPT-Neo on five Jane Austen novels.

    OMP_NUM_THREADS=1 python adapters/quantplug-transformers/zoo/train_zoo.py --arch opt
    OMP_NUM_THREADS=1 python adapters/quantplug-transformers/zoo/train_zoo.py --arch gptneo

Data: the embedded Austen text (``quantplug_transformers.corpus``); five novels train, *Persuasion* is
held out. Tokenizer: a byte-level BPE (``tokenizers``) trained on the five training novels (the same
seedless, deterministic result for both models). Windows of 128 tokens drawn at random offsets with the
seed; AdamW, linear warm-up then cosine decay over ``--steps`` (or the step budget estimated from the wall-time
cap);
held-out perplexity (non-overlapping 128-token windows of *Persuasion*) every ``--eval-every`` steps,
early stop after ``--patience`` evaluations without improvement, best weights kept.

Writes ``src/quantplug_transformers/zoo/<arch>-austen/``: ``config.json``, fp16 ``model.safetensors``,
tokenizer files and ``zoo.json`` (seed, schedule, steps, wall time, held-out perplexity of the fp32 and of
the fp16 weights). One thread, one model at a time: the numbers in ``zoo.json`` were measured so.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from quantplug_transformers import corpus

logger = logging.getLogger("train_zoo")
ROOT = Path(__file__).resolve().parents[1] / "src" / "quantplug_transformers" / "zoo"
CONTEXT = 128
EOS = "<|endoftext|>"


def train_tokenizer(vocab_size: int, out_dir: Path) -> Any:
    """A byte-level BPE trained on the five training novels, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.austen_text("train").split("\n\n"), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS, model_max_length=CONTEXT)
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(arch: str, vocab: int, hidden: int, layers: int, heads: int, ffn: int, dropout: float,
                eos_id: int) -> torch.nn.Module:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, OPTConfig, OPTForCausalLM

    if arch == "opt":
        cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                        num_attention_heads=heads, max_position_embeddings=CONTEXT, word_embed_proj_dim=hidden,
                        do_layer_norm_before=True, dropout=dropout, attention_dropout=dropout,
                        pad_token_id=eos_id, bos_token_id=eos_id, eos_token_id=eos_id)
        return OPTForCausalLM(cfg)
    cfg = GPTNeoConfig(vocab_size=vocab, max_position_embeddings=CONTEXT, hidden_size=hidden, num_layers=layers,
                       attention_types=[[["global", "local"], layers // 2]], num_heads=heads, intermediate_size=ffn,
                       window_size=CONTEXT // 2, resid_dropout=dropout, embed_dropout=dropout,
                       attention_dropout=dropout, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return GPTNeoForCausalLM(cfg)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch: int = 32) -> float:
    """exp(mean next-token NLL) over non-overlapping CONTEXT-token windows (the adapter's definition)."""
    model.eval()
    n = ids.numel() // CONTEXT
    windows = ids[: n * CONTEXT].view(n, CONTEXT)
    total, count = 0.0, 0
    for start in range(0, n, batch):
        x = windows[start:start + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["opt", "gptneo"], required=True)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=28.0, help="wall-time cap, evaluations included")
    ap.add_argument("--steps", type=int, default=None,
                    help="fixed step budget of the cosine schedule (default: the steps that fit --minutes, "
                         "re-estimated as training goes)")
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    name = f"{args.arch}-austen"
    out = args.out or ROOT / name
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = train_tokenizer(args.vocab, tmp)
    eos_id = int(tok.convert_tokens_to_ids(EOS))
    train_ids = torch.tensor(tok(corpus.austen_text("train"))["input_ids"], dtype=torch.long)
    test_ids = torch.tensor(tok(corpus.austen_text("test"))["input_ids"], dtype=torch.long)
    logger.info("tokens: train %d, held-out %d (vocab %d)", train_ids.numel(), test_ids.numel(), len(tok))
    model = build_model(args.arch, len(tok), args.hidden, args.layers, args.heads, args.ffn, args.dropout, eos_id)
    params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %d parameters", name, params)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60.0
    total_steps = args.steps or 10_000_000  # without --steps: replaced after timing the first steps
    best, best_state, best_step, bad, history = math.inf, None, 0, 0, []
    step, tokens = 0, 0
    train_start = time.perf_counter()
    stop_reason = "time cap"
    while True:
        if args.steps is None and step >= 50 and step % 50 == 0:
            # the step budget that fits the wall-time cap, re-estimated as the machine's load changes
            # (evaluations take ~12 % of the time)
            per_step = (time.perf_counter() - train_start) / step
            left = int(0.88 * (budget - (time.perf_counter() - t0)) / per_step)
            total_steps = max(args.warmup * 2, step + max(left, 0))
            logger.info("%.3fs per step: cosine schedule over %d steps", per_step, total_steps)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if step >= args.warmup:
            frac = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        starts = torch.randint(0, train_ids.numel() - CONTEXT, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + CONTEXT] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % 50 == 0:
            logger.info("step %d loss %.4f lr %.2e (%.0fs)", step, float(loss), lr, time.perf_counter() - t0)
        done_steps = step >= total_steps
        out_of_time = time.perf_counter() - t0 > budget
        if step % args.eval_every == 0 or done_steps or out_of_time:
            ppl = perplexity(model, test_ids)
            history.append({"step": step, "heldout_ppl": round(ppl, 3), "seconds": round(time.perf_counter() - t0)})
            logger.info("step %d held-out perplexity %.2f", step, ppl)
            if ppl < best:
                best, best_step, bad = ppl, step, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
            if bad >= args.patience:
                stop_reason = f"held-out perplexity did not improve for {args.patience} evaluations"
                break
            if done_steps:
                stop_reason = "end of the cosine schedule"
                break
            if out_of_time:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    fp32_ppl = perplexity(model, test_ids)
    model.half().save_pretrained(str(tmp), safe_serialization=True)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), torch_dtype=torch.float32)
    fp16_ppl = perplexity(reloaded, test_ids)
    meta = {
        "name": name, "arch": args.arch, "model_class": type(model).__name__, "parameters": params,
        "context": CONTEXT, "vocab": len(tok), "tokenizer": "byte-level BPE trained on the five training novels",
        "data": {"train": list(corpus.TRAIN), "held_out": list(corpus.HELD_OUT),
                 "train_tokens": train_ids.numel(), "held_out_tokens": test_ids.numel()},
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "schedule": f"AdamW (betas 0.9/0.95, wd 0.1), linear warm-up {args.warmup} steps, cosine to 10% "
                    f"over {total_steps} steps, grad clip 1.0",
        "steps": step, "best_step": best_step, "tokens_seen": tokens, "stop_reason": stop_reason,
        "history": history, "heldout_ppl_fp32": round(fp32_ppl, 3), "heldout_ppl_fp16": round(fp16_ppl, 3),
        "wall_seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    (tmp / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    logger.info("wrote %s: held-out perplexity %.2f (fp32) / %.2f (fp16)", out, fp32_ppl, fp16_ppl)


if __name__ == "__main__":
    main()
