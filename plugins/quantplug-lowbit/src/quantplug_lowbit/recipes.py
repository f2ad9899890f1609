"""Recipes ``bwn``, ``binaryconnect``, ``twn`` and ``ttq``: the papers' settings on quantplug's pipeline.

All four quantize weights only (the papers keep activations in full precision) on a 2-bit symmetric grid,
which holds ``{-a, +a}`` and ``{-a, 0, +a}`` as codes ``{-1, +1}`` / ``{-1, 0, +1}`` (see ``grid``). Which layers
stay in full precision follows each paper's released code (``bits.first_layer_bits`` / ``last_layer_bits``:
0 = full precision, None = like every other layer):

* BWN (``allenai/XNOR-Net``, ``util.lua``: ``for i = 2, #convNodes-1``): first and last layer full precision.
* BinaryConnect (``MatthieuCourbariaux/BinaryConnect``, ``cifar10.py``): every layer binary, the last included.
* TWN (``fengfu-chris/caffe-twns``: every convolution and inner product is ternarized): every layer ternary.
* TTQ (``czhu95/ternarynet``, ``tw-cifar10-resnet.py``: "don't binarize first and last layer"): first and last
  layer full precision.

The closed-form recipes (``bwn``, ``binaryconnect``, ``twn``) need no training: the engine runs with 0 iterations
and a few calibration samples. Their ``reconstruct`` preset trains the latent weights block by block with the
reconstruction loss instead (``learn_latent``). ``ttq`` fine-tunes its scales with the task loss in a model pass.
"""

from __future__ import annotations

from typing import Any

from quantplug.recipes import RecipeSpec

__all__ = ["BINARYCONNECT", "BWN", "RECIPES", "TTQ", "TWN"]

FULL_PRECISION = 0

#: weights only, a 2-bit symmetric grid, no training; observers are irrelevant (the roundings set the scales)
_CLOSED_FORM: dict[str, Any] = {
    "weight": {"bits": 2, "symmetric": True, "granularity": {"kind": "per_channel", "axis": 0}},
    "activation": None,
    "weight_observer.name": "minmax",
    "recon.iters": 0,
    "calib.num_samples": 64,
}

#: the latent weights of every block trained with the block reconstruction loss (ours: BRECQ's block setting)
_RECONSTRUCT: dict[str, Any] = {
    "recon.iters": 500,
    "recon.lr": 1e-3,
    "recon.lr_schedule": "cosine",
    "scheduler.name": "block",
    "calib.num_samples": 1024,
}

BWN = RecipeSpec(
    name="bwn",
    description="Binary-weight networks (XNOR-Net's BWN): a * sign(W), a = mean |W| per output channel; "
    "first and last layer full precision",
    overrides={**_CLOSED_FORM, "rounding": {"name": "binary", "options": {}},
               "bits.first_layer_bits": FULL_PRECISION, "bits.last_layer_bits": FULL_PRECISION},
    presets={"reconstruct": {**_RECONSTRUCT, "rounding.options.learn_latent": True}},
    source="Rastegari et al., 'XNOR-Net: ImageNet Classification Using Binary Convolutional Neural Networks', "
    "ECCV 2016 (code: allenai/XNOR-Net)",
)

BINARYCONNECT = RecipeSpec(
    name="binaryconnect",
    description="BinaryConnect: stochastic binarization, +a with probability hard_sigmoid(W / a), a = mean |W| "
    "per layer; every layer binary",
    overrides={**_CLOSED_FORM, "rounding": {"name": "binary", "options": {"stochastic": True}},
               "weight.granularity": {"kind": "per_tensor"},
               "bits.first_layer_bits": None, "bits.last_layer_bits": None},
    presets={"deterministic": {"rounding.options.stochastic": False}},
    source="Courbariaux, Bengio, David, 'BinaryConnect: Training Deep Neural Networks with binary weights "
    "during propagations', NeurIPS 2015 (code: MatthieuCourbariaux/BinaryConnect)",
)

TWN = RecipeSpec(
    name="twn",
    description="Ternary weight networks: Delta = 0.7 mean |W|, a = mean |W| of the kept weights, one per layer; "
    "every layer ternary",
    overrides={**_CLOSED_FORM, "rounding": {"name": "ternary", "options": {}},
               "weight.granularity": {"kind": "per_tensor"},
               "bits.first_layer_bits": None, "bits.last_layer_bits": None},
    presets={"reconstruct": {**_RECONSTRUCT, "rounding.options.learn_latent": True},
             "per-channel": {"weight.granularity": {"kind": "per_channel", "axis": 0}}},
    source="Li, Zhang, Liu, 'Ternary Weight Networks', arXiv 1605.04711, 2016 (code: fengfu-chris/caffe-twns)",
)

TTQ = RecipeSpec(
    name="ttq",
    description="Trained ternary quantization: {-W_n, 0, +W_p} per layer, Delta = 0.05 max |W|, scales (and "
    "latent weights) fine-tuned with the task loss on the calibration data; first and last layer full precision",
    overrides={
        **_CLOSED_FORM,
        "rounding": {"name": "nearest", "options": {}},  # replaced by the pass's lookup tables
        "weight.granularity": {"kind": "per_tensor"},
        "bits.first_layer_bits": FULL_PRECISION,
        "bits.last_layer_bits": FULL_PRECISION,
        "calib.num_samples": 1024,
        "passes": [{"name": "ttq", "options": {}}],
    },
    presets={
        "scales-only": {"passes": [{"name": "ttq", "options": {"learn_assignments": False}}]},
        # W_p = W_n = 1.0 as in the code (on its raw weights, BatchNorm after), here on the paper's normalized weights
        "official-init": {"passes": [{"name": "ttq", "options": {"init": "max"}}]},
    },
    source="Zhu, Han, Mao, Dally, 'Trained Ternary Quantization', ICLR 2017 (code: czhu95/ternarynet)",
)

RECIPES: tuple[RecipeSpec, ...] = (BWN, BINARYCONNECT, TWN, TTQ)
