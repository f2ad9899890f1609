"""The ``nwq`` recipe (Wang et al., NeurIPS 2022): network-wise reconstruction with NWQ's three parts.

Shared setting of the CNN PTQ papers NWQ compares with (BRECQ, QDrop): 1 024 calibration images,
batch 32, MSE-initialized per-channel weights and per-tensor activations, first and last layer at
8 bits, activation steps learned LSQ-style with Adam (lr 4e-5, cosine decay, QDrop's setting).
NWQ-specific numbers the paper's text would fix but we could not read (see the README) are our
choices: 20 000 network-wise iterations (about QDrop's total compute: its 20 000 iterations per block,
summed over the blocks, cost about one network forward / backward each), rounding lr 1e-3 (AdaRound's),
temperature 1 -> 0.01, mixup 0.5 -> 0 over the first 80 % of the iterations, AR weight 1.
"""

from __future__ import annotations

from typing import Any

from quantplug.recipes import RecipeSpec

__all__ = ["NWQ", "OFFICIAL", "CPU_FAST"]

#: the paper-scale setting (1 024 images, batch 32 as in BRECQ / QDrop; iterations our choice, see above)
OFFICIAL: dict[str, Any] = {"recon.iters": 20000, "recon.batch_size": 32, "calib.num_samples": 1024}

#: a CPU budget equal to QDrop's ``cpu-fast`` (2 000 iterations per block there, 2 000 network-wise here:
#: about the same number of block forward / backward passes) on 512 images; the paper's "competitive
#: results at 10 % of the computation" regime relative to the official setting
CPU_FAST: dict[str, Any] = {"recon.iters": 2000, "recon.batch_size": 32, "calib.num_samples": 512,
                            "recon.act_lr": 1e-4}

NWQ = RecipeSpec(
    name="nwq",
    extends="nearest",
    description="NWQ: network-wise reconstruction, annealing-softmax rounding, annealing mixup, "
                "activation regularization",
    overrides={
        "rounding.name": "annealing-softmax",
        "scheduler.name": "network",
        "loss.name": "activation-regularization",
        "activation_policy.name": "annealing-mixup",
        "recon.order": "joint",
        "recon.lr": 1e-3,
        "recon.learn_act_step": True,
        "recon.act_lr": 4e-5,
        **OFFICIAL,
    },
    presets={"official": OFFICIAL, "cpu-fast": CPU_FAST},
    source="Wang, Zheng, Liu, Li, 'Leveraging Inter-Layer Dependency for Post-Training Quantization', NeurIPS 2022",
)
