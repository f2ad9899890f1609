"""Built-in recipes: round-to-nearest PTQ, with and without learned activation steps."""

from __future__ import annotations

from quantplug.hookspecs import hookimpl
from quantplug.recipes import RecipeSpec

NEAREST = RecipeSpec(
    name="nearest",
    description="Round-to-nearest PTQ: MSE-calibrated per-channel weights and per-tensor activations, no training",
    # no training: 256 calibration samples are plenty for the observers and keep the embedded default fast
    overrides={"rounding.name": "nearest", "recon.iters": 0, "calib.num_samples": 256},
    source="Nagel et al., 'A White Paper on Neural Network Quantization', 2021 (PTQ baseline)",
)

NEAREST_LSQ = RecipeSpec(
    name="nearest-lsq",
    extends="nearest",
    description="Nearest rounding with activation step sizes learned block by block (LSQ-style, Adam)",
    overrides={"recon.iters": 2000, "recon.learn_act_step": True, "recon.act_lr": 4e-4},
    presets={"cpu-fast": {"recon.iters": 300}},
    source="Esser et al., 'Learned Step Size Quantization', ICLR 2020",
)


@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register(NEAREST)
    register(NEAREST_LSQ)
