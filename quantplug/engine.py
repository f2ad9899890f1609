"""The reconstruction engine: the only place that drives roundings, losses and activation policies.

For each unit of the scheduler's plan: cache its inputs (from the model quantized so far) and its
full-precision outputs; optimize the unit's rounding and step-size parameters with the recipe's
loss, the rounding regularizer and the activation policy; harden; checkpoint; move on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from quantplug.cache import BYTES, TensorCache, human_bytes
from quantplug.config import Recipe
from quantplug.distributed import (
    any_rank,
    average_gradients,
    batch_per_rank,
    is_main_process,
    sum_over_ranks,
    world,
)
from quantplug.errors import ArtifactError, IncompatibleComponentsError
from quantplug.interfaces import (
    ActivationPolicy,
    LossContext,
    ModelAdapter,
    ReconstructionLoss,
    ReconUnit,
    Rounding,
    UnitSpec,
)
from quantplug.memory import release_freed_memory
from quantplug.modules import QuantLayer, quant_layers
from quantplug.progress import progress_bar
from quantplug.tensors import to_device as _to_device

logger = logging.getLogger(__name__)


CHECKPOINT_FILE = "checkpoint.pt"  # inside RunContext.checkpoint_dir
CHECKPOINT_VERSION = 3  # 2: records the run's identity (model, options, data, calibration set) beside the recipe;
# 3: the identity includes a fingerprint of the calibration data


class _StopForward(Exception):
    pass


@dataclass
class UnitRecord:
    """What happened to one unit in one pass (saved in the manifest)."""

    index: int
    name: str
    layers: list[str]
    loss_before: float
    loss_after: float
    iters: int
    seconds: float
    pass_name: str = "joint"
    #: processor time of the unit (all threads of this process), which machine load does not inflate; None in
    #: records written before it was recorded
    cpu_seconds: float | None = None


def recon_passes(recipe: Recipe) -> list[str]:
    """The passes over the plan: ``joint``, or ``weights`` then (if steps are learned) ``activations``."""
    recon = recipe.recon
    if recon.order == "weights_first" and recipe.activation is not None:
        return ["weights", "activations"] if recon.learn_act_step else ["weights"]
    return ["joint"]


@dataclass
class RunContext:
    """Everything a run needs; passed to event hooks and to components that need the wider model."""

    session: Any
    recipe: Recipe
    adapter: ModelAdapter
    fp_model: nn.Module
    q_model: nn.Module
    blocks: list[UnitSpec]
    calib_inputs: list[Any]
    calib_targets: list[Any]
    device: torch.device
    seed: int = 0
    checkpoint_dir: str | None = None
    plan: list[ReconUnit] = field(default_factory=list)
    records: list[UnitRecord] = field(default_factory=list)
    model_id: str = ""
    # what the run was built from (model id, model options, data spec, calibration sample count and seed), saved
    # in the reconstruction checkpoint and compared on resume: a checkpoint never continues on other inputs
    identity: dict[str, Any] = field(default_factory=dict)

    def block(self, name: str) -> UnitSpec:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)


# --------------------------------------------------------------------------- unit helpers
def unit_layers(run: RunContext, unit: ReconUnit) -> list[str]:
    if unit.layer is not None:
        return [unit.layer]
    return [name for b in unit.blocks for name in run.block(b).layers]


def unit_module(run: RunContext, model: nn.Module, unit: ReconUnit) -> nn.Module:
    if unit.layer is not None:
        return model.get_submodule(unit.layer)
    mods = [run.adapter.block_module(model, run.block(b)) for b in unit.blocks]
    return mods[0] if len(mods) == 1 else nn.Sequential(*mods)


def entry_exit_modules(run: RunContext, model: nn.Module, unit: ReconUnit) -> tuple[nn.Module, nn.Module]:
    if unit.layer is not None:
        layer = model.get_submodule(unit.layer)
        return layer, layer
    first = run.block(unit.blocks[0]).modules[0]
    last = run.block(unit.blocks[-1]).modules[-1]
    return model.get_submodule(first), model.get_submodule(last)


@torch.no_grad()
def capture(
    run: RunContext,
    model: nn.Module,
    module: nn.Module,
    *,
    output: bool,
    cache_mode: str,
    directory: str | None = None,
) -> TensorCache:
    """Run ``model`` over the calibration inputs and cache ``module``'s input (or output), stopping early."""
    cache: TensorCache | None = None
    position = 0
    total = sum(_batch_len(x) for x in run.calib_inputs)
    batch = 0

    def store(value: torch.Tensor) -> None:
        nonlocal cache, position
        if value.shape[0] != batch and value.dim() >= 1 and value.shape[0] % batch == 0:
            # a model that flattens (batch, tokens) into rows before a layer (OPT's fc1 / fc2): one entry per sample
            value = value.reshape(batch, -1, *value.shape[1:])
        if cache is None:
            cache = TensorCache(cache_mode, total, value.shape[1:], directory, dtype=value.dtype)
        cache.write(position, value)
        position += value.shape[0]
        raise _StopForward

    if output:
        handle = module.register_forward_hook(lambda m, a, out: store(_primary(out)))
    else:
        handle = module.register_forward_pre_hook(lambda m, a: store(a[0]))
    try:
        for inputs in run.calib_inputs:
            batch = _batch_len(inputs)
            try:
                run.adapter.forward(model, _to_device(inputs, run.device))
            except _StopForward:
                continue
            raise RuntimeError("capture point was never reached: is the module part of the model's forward pass?")
    finally:
        handle.remove()
    assert cache is not None
    return cache


def _primary(out: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple (Hugging Face layers
    return ``(hidden_states, ...)``)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _batch_len(x: Any) -> int:
    return x.shape[0] if isinstance(x, torch.Tensor) else len(x)


@torch.no_grad()
def estimate_cache_bytes(run: RunContext, plan: Sequence[ReconUnit], cache_mode: str, needs_fp_inputs: bool) -> int:
    """Peak cache bytes of any unit: (inputs + targets [+ fp inputs]) x samples x bytes per value."""
    sample = _slice_first(run.calib_inputs[0])
    sizes: dict[int, int] = {}
    handles = []
    wanted: list[tuple[nn.Module, bool]] = []
    for unit in plan:
        entry, exit_ = entry_exit_modules(run, run.fp_model, unit)
        wanted += [(entry, False), (exit_, True)]
    for module, is_out in wanted:
        key = id(module) * 2 + int(is_out)
        if is_out:
            handles.append(module.register_forward_hook(
                lambda m, a, o, k=key: sizes.__setitem__(k, _primary(o).numel())))  # one sample
        else:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k=key: sizes.__setitem__(k, a[0].numel())))
    try:
        run.adapter.forward(run.fp_model, _to_device(sample, run.device))
    finally:
        for h in handles:
            h.remove()
    total = sum(_batch_len(x) for x in run.calib_inputs)
    peak = 0
    for unit in plan:
        entry, exit_ = entry_exit_modules(run, run.fp_model, unit)
        n_in = sizes.get(id(entry) * 2, 0)
        n_out = sizes.get(id(exit_) * 2 + 1, 0)
        per_sample = (n_in * (2 if needs_fp_inputs else 1) + n_out) * BYTES[cache_mode]
        peak = max(peak, per_sample * total)
    return peak


def _slice_first(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x[:1]
    if isinstance(x, dict):
        return {k: _slice_first(v) for k, v in x.items()}
    return x


# --------------------------------------------------------------------------- engine
@dataclass
class UnitWork:
    """One unit being reconstructed: its caches, layers, rounders and the parameters being learned."""

    unit: ReconUnit
    names: list[str]
    layers: list[QuantLayer]
    module: nn.Module
    inputs: TensorCache
    targets: TensorCache
    fp_inputs: TensorCache | None
    extras: dict[str, torch.Tensor]
    rounders: list[Any]
    act_quantizers: list[Any]
    round_params: list[torch.Tensor]
    step_params: list[torch.Tensor]
    generator: torch.Generator
    loss_before: float

    def close(self) -> None:
        for c in (self.inputs, self.targets, self.fp_inputs):
            if c is not None:
                c.close()


class ReconstructionEngine:
    """Reconstructs the units of ``run.plan`` in order; see the module docstring."""

    def __init__(
        self,
        run: RunContext,
        rounding: Rounding,
        loss: ReconstructionLoss,
        policy: ActivationPolicy,
        transforms: Sequence[Any] = (),
        on_unit_end: Callable[[ReconUnit, UnitRecord], None] | None = None,
    ) -> None:
        self.run = run
        self.rounding = rounding
        self.loss = loss
        self.policy = policy
        self.transforms = list(transforms)
        self.on_unit_end = on_unit_end
        recon = run.recipe.recon
        if recon.learn_act_step and run.recipe.activation is None:
            raise IncompatibleComponentsError(
                "recon.learn_act_step=true needs quantized activations; set --a-bits or turn it off"
            )
        self.cache_mode = recon.cache

    # ------------------------------------------------------------------ checkpoint
    def _ckpt_path(self) -> str | None:
        d = self.run.checkpoint_dir
        return os.path.join(d, CHECKPOINT_FILE) if d else None

    def checkpoint_identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the run's identity, the recipe and the unit plan."""
        return {
            **self.run.identity,
            "recipe": self.run.recipe.to_dict(),
            "plan": [asdict(u) for u in self.run.plan],
        }

    def save_checkpoint(self, next_index: int) -> None:
        path = self._ckpt_path()
        if path is None or not is_main_process():  # every rank holds the same state: rank 0 writes it
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(
            {
                "checkpoint_version": CHECKPOINT_VERSION,
                "next_unit": next_index,
                "state": self.run.q_model.state_dict(),
                "records": [asdict(r) for r in self.run.records],
                "identity": self.checkpoint_identity(),
                # also at the top, where checkpoints without an identity (version 1) kept them
                "plan": [asdict(u) for u in self.run.plan],
                "recipe": self.run.recipe.to_dict(),
            },
            tmp,
        )
        os.replace(tmp, path)

    def load_checkpoint(self) -> int:
        """The step to continue from (0 without a checkpoint); refuses a checkpoint of another run."""
        path = self._ckpt_path()
        if path is None:
            return 0
        if not os.path.exists(path):
            logger.info("--resume: no checkpoint at %s; starting from the first unit", path)
            return 0
        try:
            data = torch.load(path, map_location=self.run.device, weights_only=False)
        except Exception as exc:
            raise ArtifactError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
        self._check_checkpoint_identity(path, data)
        try:
            self.run.q_model.load_state_dict(data["state"])
            self.run.records = [UnitRecord(**r) for r in data["records"]]
            next_unit = int(data["next_unit"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"checkpoint {path} does not fit this run ({exc}); drop --resume to start over "
                                "(the checkpoint is then replaced)") from exc
        logger.info("resuming after unit %d of %d", next_unit, len(self.run.plan))
        return next_unit

    def _check_checkpoint_identity(self, path: str, data: dict[str, Any]) -> None:
        """Refuse a checkpoint written with another model, model options, data, calibration set, recipe or plan.

        A checkpoint from before identities were recorded (no ``identity``) is accepted with a warning when its
        recipe and plan match: its model and data cannot be checked."""
        saved = data.get("identity")
        if saved is None:
            current = {"recipe": self.run.recipe.to_dict(), "plan": [asdict(u) for u in self.run.plan]}
            saved = {k: data.get(k) for k in current}
            logger.warning("checkpoint %s does not record its model and data (written by an older quantplug): "
                           "resuming on the assumption that they are the same as this run's", path)
        else:
            current = self.checkpoint_identity()
            unrecorded = sorted(set(current) - set(saved))
            if unrecorded:  # written before these were part of the identity
                logger.warning("checkpoint %s does not record %s (written by an older quantplug): resuming on the "
                               "assumption that they are the same as this run's", path, ", ".join(unrecorded))
                current = {k: v for k, v in current.items() if k in saved}
        differing = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if differing:
            details = "; ".join(_describe_difference(k, saved.get(k), current.get(k)) for k in differing)
            raise ArtifactError(
                f"checkpoint {path} was written by a run with other settings ({details}); resume with the original "
                "settings, or drop --resume to start over (the checkpoint is then replaced)")

    # ------------------------------------------------------------------ main loop
    def reconstruct(self, resume: bool = False,
                    on_pass_start: Callable[[str], None] | None = None) -> list[UnitRecord]:
        """Run every pass over the plan; ``on_pass_start(name)`` runs once as each pass begins."""
        steps = [(p, i) for p in recon_passes(self.run.recipe) for i in range(len(self.run.plan))]
        start = self.load_checkpoint() if resume else 0
        current = None
        for step in range(start, len(steps)):
            pass_name, index = steps[step]
            if pass_name != current:
                current = pass_name
                self._set_activation_mode(pass_name)
                if index == 0 and on_pass_start is not None:
                    on_pass_start(pass_name)
            unit = self.run.plan[index]
            record = self.reconstruct_unit(index, unit, pass_name)
            release_freed_memory(self.run.device)  # resident memory must not climb from unit to unit
            self.run.records.append(record)
            self.save_checkpoint(step + 1)
            if self.on_unit_end is not None:
                self.on_unit_end(unit, record)
        self._set_activation_mode("joint")
        return self.run.records

    def _set_activation_mode(self, pass_name: str) -> None:
        """The weights pass of ``weights_first`` runs with every activation quantizer off."""
        for _, layer in quant_layers(self.run.q_model):
            if layer.input_quantizer is not None:
                layer.input_quantizer.enabled = pass_name != "weights"

    def reconstruct_unit(self, index: int, unit: ReconUnit, pass_name: str = "joint") -> UnitRecord:
        t0, cpu0 = time.perf_counter(), time.process_time()
        work = self.setup_unit(index, unit, pass_name)  # calls self.loss.begin(run, unit)
        loss_before = work.loss_before
        budget = self.run.recipe.recon.act_iters if pass_name == "activations" else self.run.recipe.recon.iters
        iters = budget if (work.round_params or work.step_params) else 0
        if iters:
            self.optimize(work, iters)
        self.harden_unit(work)
        loss_after = self.evaluate_loss(work.module, work.inputs, work.targets, work.extras)
        self.loss.end(self.run, unit)
        work.close()
        record = UnitRecord(index, unit.name, work.names, loss_before, loss_after, iters, time.perf_counter() - t0,
                            pass_name, time.process_time() - cpu0)
        logger.info("unit %s (%s): loss %.4g -> %.4g (%d iters, %.1fs)", unit.name, pass_name, loss_before,
                    loss_after, iters, record.seconds)
        return record

    def setup_unit(self, index: int, unit: ReconUnit, pass_name: str = "joint") -> UnitWork:
        """Cache the unit's inputs and targets, measure the loss before, attach roundings, make steps learnable."""
        run = self.run
        recon = run.recipe.recon
        names = unit_layers(run, unit)
        layers: list[QuantLayer] = [
            m for n in names if isinstance(m := run.q_model.get_submodule(n), QuantLayer)
        ]
        q_entry, _ = entry_exit_modules(run, run.q_model, unit)
        fp_entry, fp_exit = entry_exit_modules(run, run.fp_model, unit)
        inputs = capture(run, run.q_model, q_entry, output=False, cache_mode=self.cache_mode)
        targets = capture(run, run.fp_model, fp_exit, output=True, cache_mode=self.cache_mode)
        fp_inputs = None
        if self.policy.needs_fp_inputs or any(t.applies_to == "fp_inputs" for t in self.transforms):
            fp_inputs = capture(run, run.fp_model, fp_entry, output=False, cache_mode=self.cache_mode)
        self._apply_transforms(unit, inputs, fp_inputs, targets)
        extras = {k: v.detach().cpu() for k, v in self.loss.capture_extras(run, unit).items()}
        missing = set(self.loss.extra_keys) - set(extras)
        if missing:
            raise IncompatibleComponentsError(f"loss {self.loss.name!r} did not capture its extras {sorted(missing)}")
        module = unit_module(run, run.q_model, unit)
        generator = torch.Generator().manual_seed(run.seed * 1_000_003 + index)
        self.loss.begin(run, unit)
        loss_before = self.evaluate_loss(module, inputs, targets, extras)
        rounders = []
        if pass_name != "activations":
            for layer in layers:
                if layer.quantizes_weight:
                    layer.rounder = self.rounding.attach(layer, generator=generator)
                    rounders.append(layer.rounder)
        act_quantizers = [q for layer in layers if (q := layer.input_quantizer) is not None and q.active]
        round_params = [p for r in rounders for p in r.parameters() if p.requires_grad]
        learn_steps = recon.learn_act_step and pass_name != "weights"
        step_params = [q.make_step_learnable() for q in act_quantizers] if learn_steps else []
        return UnitWork(unit, names, layers, module, inputs, targets, fp_inputs, extras, rounders, act_quantizers,
                        round_params, step_params, generator, loss_before)

    def harden_unit(self, work: UnitWork) -> None:
        """Store integer codes (and final quantization parameters) and freeze the activation steps."""
        for layer in work.layers:
            harden_layer(layer)
        for q in work.act_quantizers:
            q.freeze_step()

    def _apply_transforms(self, unit: ReconUnit, inputs: TensorCache, fp_inputs: TensorCache | None,
                          targets: TensorCache) -> None:
        run = self.run
        step = run.recipe.calib.batch_size
        for transform in self.transforms:
            cache = fp_inputs if transform.applies_to == "fp_inputs" else inputs
            assert cache is not None
            for start in range(0, cache.num, step):
                sl = slice(start, min(start + step, cache.num))
                cache.write(start, transform.apply(run, unit, cache.read(sl, run.device)))
            if transform.applies_to == "fp_inputs":  # the targets follow the corrected fp inputs
                fp_module = unit_module(run, run.fp_model, unit)
                with torch.no_grad():
                    for start in range(0, cache.num, step):
                        sl = slice(start, min(start + step, cache.num))
                        targets.write(start, fp_module(cache.read(sl, run.device)))

    def optimize(self, work: UnitWork, iters: int) -> None:
        """``iters`` optimizer steps on the unit's rounding and step-size parameters."""
        unit, module, inputs, targets, fp_inputs = work.unit, work.module, work.inputs, work.targets, work.fp_inputs
        extras, rounders, act_quantizers = work.extras, work.rounders, work.act_quantizers
        round_params, step_params, generator = work.round_params, work.step_params, work.generator
        recon = self.run.recipe.recon
        device = self.run.device
        optimizers: list[torch.optim.Optimizer] = []
        schedulers: list[Any] = []
        if round_params:
            round_opt = torch.optim.Adam(round_params, lr=recon.lr)
            optimizers.append(round_opt)
            if recon.lr_schedule == "cosine":
                schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(round_opt, T_max=iters, eta_min=0.0))
        if step_params:
            opt = torch.optim.Adam(step_params, lr=recon.act_lr)
            optimizers.append(opt)
            schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0))
        self.policy.begin(act_quantizers, generator)
        needs_quantized = bool(getattr(self.loss, "needs_quantized_output", False))
        keeps_policy = needs_quantized and bool(getattr(self.loss, "quantized_output_keeps_policy", False))
        mixing = any(q.mixer is not None or q.selector is not None for q in act_quantizers)
        learned = round_params + step_params
        n = inputs.num
        batch = min(batch_per_rank(recon.batch_size), n)  # this rank's share of the step's batch
        bar = progress_bar(range(iters), desc=f"reconstruct {unit.name}", unit="it")
        try:
            if keeps_policy and (fp_inputs is not None or mixing) and not self.policy.controls_unit_entry:
                raise IncompatibleComponentsError(
                    f"loss {self.loss.name!r} wants its second output with the policy's mixing kept inside the unit, "
                    f"which activation policy {self.policy.name!r} cannot do; use the drop policy (QDrop) or the "
                    "loss option that switches the policy off for that output")
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
            for it in bar:
                progress = it / iters
                idx = torch.randint(n, (batch,), generator=generator)
                x = x_quant = inputs.read(idx, device)
                if fp_inputs is not None:
                    x = self.policy.mix_unit_input(x, fp_inputs.read(idx, device))
                y = targets.read(idx, device)
                self.policy.step(progress)
                for r in rounders:
                    r.step(progress)
                out = module(x)
                quantized_out = None
                if needs_quantized and (fp_inputs is not None or mixing):
                    quantized_out = (self._entry_quantized_forward(module, x_quant) if keeps_policy
                                     else quantized_forward(module, x_quant, act_quantizers))
                ctx = LossContext({k: v[idx].to(device) for k, v in extras.items()}, progress, quantized_out)
                loss = self.loss(out, y, ctx)
                total = loss
                for r in rounders:
                    reg = r.regularization(progress)
                    if reg is not None:
                        total = total + reg
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                total.backward()
                average_gradients(learned)  # data-parallel: every rank takes the same step
                for opt in optimizers:
                    opt.step()
                for sched in schedulers:
                    sched.step()
                nonfinite |= ~torch.isfinite(total.detach())  # every step, without waiting for the device
                if (it % 50 == 0 or it == iters - 1) and any_rank(bool(nonfinite), device):
                    raise FloatingPointError(
                        f"the reconstruction loss of unit {unit.name} became NaN or infinite by iteration {it + 1} "
                        f"of {iters}; the unit's learned parameters are unusable. Check the calibration data, or "
                        "lower the learning rates (recon.lr, recon.act_lr); with recon.cache=fp16, try fp32")
                if it % max(1, recon.log_every // 10) == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
        finally:
            bar.close()
            self.policy.end(act_quantizers)

    def _entry_quantized_forward(self, module: nn.Module, x: Any) -> Any:
        """``module(x)`` with the unit's input quantized in full and the policy's mixing inside the unit kept."""
        self.policy.quantize_unit_entry(True)
        try:
            return module(x)
        finally:
            self.policy.quantize_unit_entry(False)

    @torch.no_grad()
    def evaluate_loss(self, module: nn.Module, inputs: TensorCache, targets: TensorCache,
                      extras: dict[str, torch.Tensor] | None = None) -> float:
        total, count = 0.0, 0
        step = max(1, self.run.recipe.recon.batch_size)
        for start in range(0, inputs.num, step):
            sl = slice(start, min(start + step, inputs.num))
            out = module(inputs.read(sl, self.run.device))
            y = targets.read(sl, self.run.device)
            ctx = LossContext({k: v[sl].to(self.run.device) for k, v in (extras or {}).items()}, 1.0)
            loss = self.loss(out, y, ctx)
            total += float(loss) * (sl.stop - sl.start)
            count += sl.stop - sl.start
        total, count = sum_over_ranks([total, count], self.run.device)  # the mean over every rank's samples
        return total / max(count, 1)


def _describe_difference(key: str, saved: Any, current: Any) -> str:
    if key == "recipe" and isinstance(saved, dict) and isinstance(current, dict):
        paths = _differing_paths(saved, current, "recipe")
        return "recipe differs at " + ", ".join(paths[:5]) + (" ..." if len(paths) > 5 else "")
    if key == "plan":  # long: the field name says enough
        return "the unit plan differs"
    if key == "calib_fingerprint":
        return "the calibration data differs (the same data spec now holds other samples)"
    return f"{key}: checkpoint {saved!r}, now {current!r}"


def _differing_paths(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b), key=str) for p in _differing_paths(a.get(k), b.get(k),
                                                                                      f"{prefix}.{k}")]
    return [] if a == b else [prefix]


def harden_layer(layer: QuantLayer) -> None:
    """Fix a layer's weight for good: its rounder's integer codes and final quantization parameters, or nearest
    rounding for a weight-quantized layer without a rounder (and without codes yet)."""
    if layer.rounder is not None:
        qparams = layer.rounder.final_qparams()
        codes = layer.rounder.hard_codes()
        if qparams is not None:
            layer.weight_quantizer.set_qparams(*qparams)
        layer.set_codes(codes)
    elif layer.quantizes_weight and layer.weight_codes is None:
        layer.set_codes(layer.nearest_codes())


def quantized_forward(module: nn.Module, x: Any, act_quantizers: Sequence[Any]) -> Any:
    """``module(x)`` with every activation quantizer quantizing plainly (the policy's mixing switched off)."""
    saved = [(q.mixer, q.selector) for q in act_quantizers]
    for q in act_quantizers:
        q.mixer = q.selector = None
    try:
        return module(x)
    finally:
        for q, (mixer, selector) in zip(act_quantizers, saved, strict=True):
            q.mixer, q.selector = mixer, selector


def describe_memory(run: RunContext, plan: Sequence[ReconUnit], cache_mode: str, needs_fp_inputs: bool) -> str:
    peak = estimate_cache_bytes(run, plan, cache_mode, needs_fp_inputs)
    where = "on disk" if cache_mode == "disk" else "in RAM"
    processes = world()[1]
    share = f" per process ({processes} processes, each caching its shard)" if processes > 1 else ""
    return f"reconstruction cache: up to {human_bytes(peak)} {where} ({cache_mode}){share}"
