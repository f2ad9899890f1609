"""The main job as a function: resolve a recipe, load, calibrate, reconstruct, evaluate, save."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from quantplug.calibrate import calibrate_activations, calibrate_weights
from quantplug.config import Recipe
from quantplug.distributed import init_from_environment, is_main_process, shard_indices, world
from quantplug.engine import CHECKPOINT_FILE, ReconstructionEngine, RunContext, UnitRecord, describe_memory
from quantplug.errors import ConfigError, DataError
from quantplug.evaluate import compare, evaluate_together
from quantplug.export import check_output_dir, save_run
from quantplug.interfaces import ModelAdapter
from quantplug.passes import ModelPasses
from quantplug.plugins import Session
from quantplug.prepare import LayerBits, layer_bits, prepare_model
from quantplug.recipes import resolve_recipe
from quantplug.tensors import fingerprint, resolve_device

logger = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class ApplyResult:
    recipe: Recipe
    model_id: str
    out_dir: str | None
    fp_metrics: dict[str, float] = field(default_factory=dict)
    quant_metrics: dict[str, float] = field(default_factory=dict)
    records: list[UnitRecord] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    memory: str = ""
    passes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    model: nn.Module | None = None


def build_quant_model(
    adapter: ModelAdapter,
    model_id: str,
    recipe: Recipe,
    device: torch.device,
    options: Mapping[str, Any] | None = None,
    float_passes: Callable[[nn.Module], None] | None = None,
    bit_map: list[LayerBits] | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Load, fold BN, and return (full-precision copy, model prepared for quantization).

    ``float_passes`` runs on the folded float model before the full-precision copy is taken (the
    recipe's ``float``-stage model passes). ``bit_map`` (a saved run's) replaces the recipe's bit policy.
    """
    model = adapter.load(model_id, device=device, options=options)
    model = adapter.fold_batchnorm(model.eval())
    if float_passes is not None:
        float_passes(model)
    fp_model = copy.deepcopy(model)
    prepare_model(model, adapter, recipe, bit_map)
    for p in fp_model.parameters():
        p.requires_grad_(False)
    return fp_model, model


def cli_overrides(
    *,
    w_bits: int | None = None,
    a_bits: int | None = None,
    calib_samples: int | None = None,
    batch_size: int | None = None,
    iters: int | None = None,
    seed: int | None = None,
    cache: str | None = None,
) -> dict[str, Any]:
    """Translate the CLI's convenience flags into recipe override paths."""
    out: dict[str, Any] = {}
    if w_bits is not None:
        out["weight.bits"] = w_bits
    if a_bits is not None:
        if a_bits in (0, 32):  # weights only: no activation quantizers, so no activation steps to learn
            out["activation"] = None
            out["recon.learn_act_step"] = False
        else:
            out["activation.bits"] = a_bits
    if calib_samples is not None:
        out["calib.num_samples"] = calib_samples
    if batch_size is not None:
        out["recon.batch_size"] = batch_size
    if iters is not None:
        out["recon.iters"] = iters
    if seed is not None:
        out["calib.seed"] = seed
    if cache is not None:
        out["recon.cache"] = cache
    return out


def _check_finite(dataset: Dataset, what: str) -> None:
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        return
    for t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"the {what} data contains NaN or inf values; clean the data or choose another source")


def _batches(dataset: Dataset, batch_size: int) -> list[Any]:
    """Every batch of ``dataset`` held in memory: for the calibration set, which the observers, passes and
    unit caches read many times and which is small by design (``calib.num_samples``)."""
    return list(DataLoader(dataset, batch_size=batch_size, shuffle=False))


def _stream(dataset: Dataset, batch_size: int) -> DataLoader:
    """The batches of ``dataset`` read one at a time (again on every pass over the loader): for the test
    set, which may be far larger than memory (ImageNet val as float32 tensors is ~30 GB)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def resolve(session: Session, plugin: str, *, base: str | None, preset: str | None,
            overrides: Mapping[str, Any]) -> Recipe:
    recipe = resolve_recipe(session, plugin, base=base, preset=preset, overrides=overrides)
    # fail early, before loading anything, on unknown components or options
    session.make("observer", recipe.weight_observer, recipe.weight)
    if recipe.activation is not None:
        session.make("observer", recipe.activation_observer, recipe.activation)
    for kind, ref in (("rounding", recipe.rounding), ("loss", recipe.loss), ("scheduler", recipe.scheduler),
                      ("activation_policy", recipe.activation_policy)):
        session.make(kind, ref)
    for ref in recipe.data_transforms:
        session.make("data_transform", ref)
    for ref in recipe.passes:
        session.make("model_pass", ref)
    return recipe


def checkpoint_dir(out_dir: str) -> str:
    """Where a run saved to ``out_dir`` checkpoints its reconstruction: the sibling ``OUT_DIR.checkpoint``."""
    return os.path.abspath(out_dir) + ".checkpoint"


def checkpoint_file(out_dir: str) -> str:
    return os.path.join(checkpoint_dir(out_dir), CHECKPOINT_FILE)


def remove_checkpoint(out_dir: str) -> None:
    """Delete the run's checkpoint file and its directory if nothing else is in it (never a stranger's files)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(checkpoint_file(out_dir))
    with contextlib.suppress(OSError):
        os.rmdir(checkpoint_dir(out_dir))


def interrupt_hint(out_dir: str | None) -> str:
    """What an interrupted run can do next: resume only if a checkpoint was written."""
    if out_dir is not None and os.path.exists(checkpoint_file(out_dir)):
        return (f"the same command with --resume continues from the last finished unit "
                f"(checkpoint {checkpoint_dir(out_dir)})")
    if out_dir is None:
        return "nothing was checkpointed (no output directory, e.g. --no-save), so the run must start over"
    return "no unit had finished, so there is no checkpoint: the run must start over"


def _noting_interrupts(run: Callable[P, R]) -> Callable[P, R]:
    """``run`` with a note on a ``KeyboardInterrupt`` (``exc.__notes__``): can the run be resumed?"""

    @functools.wraps(run)
    def noted(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return run(*args, **kwargs)
        except KeyboardInterrupt as exc:
            out_dir = kwargs.get("out_dir")
            exc.add_note(interrupt_hint(out_dir if isinstance(out_dir, str) else None))
            raise

    return noted


@_noting_interrupts
def apply(
    plugin: str = "nearest",
    model_id: str | None = None,
    *,
    data: str | None = None,
    base: str | None = None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str = "cpu",
    out_dir: str | None = None,
    eval_samples: int | None = None,
    resume: bool = False,
    dry_run: bool = False,
    evaluate_fp: bool = True,
    model_options: Mapping[str, Any] | None = None,
    session: Session | None = None,
    report: Callable[[str], None] | None = None,
) -> ApplyResult:
    """Quantize ``model_id`` with recipe ``plugin``; evaluate against full precision; save to ``out_dir``.

    ``out_dir`` is checked first (``quantplug.export.check_output_dir``: a new or empty directory, or an earlier
    quantplug output, which is replaced once the new run is complete). With ``out_dir`` the reconstruction
    checkpoints after every unit to ``OUT_DIR.checkpoint``; ``resume`` continues from there. ``report``
    receives the user-facing messages (the plan and the cache memory estimate) before the long work starts;
    the CLI prints them. A ``KeyboardInterrupt`` leaves with a note (``exc.__notes__``) saying whether the run
    can be resumed.
    """
    if out_dir is not None:
        check_output_dir(out_dir)  # before loading anything: a refused --out wastes no time
    if resume and not dry_run and out_dir is None:  # (a missing checkpoint is logged by the engine)
        logger.warning("--resume has no effect without an output directory (--no-save): nothing was "
                       "checkpointed, so the run starts from the first unit")
    t0 = time.perf_counter()
    session = session or Session()
    recipe = resolve(session, plugin, base=base, preset=preset, overrides=overrides or {})
    model_id = model_id or session.default_model_id()
    dev = init_from_environment(resolve_device(device))  # joins torchrun's process group, if launched by it
    torch.manual_seed(recipe.calib.seed)
    adapter = session.adapter_for(model_id)
    data = data or adapter.default_data(model_id)
    if data is None:
        raise ConfigError(f"model {model_id!r} has no default data: pass --data (e.g. a directory or a data spec)")
    calib_set = session.model_data(model_id, data, "train", num_samples=recipe.calib.num_samples,
                                   seed=recipe.calib.seed, model_options=model_options)
    used = len(calib_set)  # type: ignore[arg-type]
    if used == 0:
        raise DataError(f"the calibration (train) split of {data} is empty: give data with training samples")
    if used < recipe.calib.num_samples:  # the source said so; the manifest records the count actually used
        logger.info("calibrating on %d samples (%d asked for)", used, recipe.calib.num_samples)
        recipe = replace(recipe, calib=replace(recipe.calib, num_samples=used))
    _check_finite(calib_set, "calibration")
    calib = _batches(calib_set, recipe.calib.batch_size)
    calib_inputs = [b[0] for b in calib]
    calib_targets = [b[1] for b in calib]
    # data-parallel: observers and passes see every sample, the unit caches only this rank's shard
    shard = calib if world()[1] == 1 else _batches(Subset(calib_set, shard_indices(len(calib_set))),
                                                     recipe.calib.batch_size)
    passes = ModelPasses(session, recipe, adapter, calib_inputs, calib_targets, dev, model_id=model_id,
                         model_options=model_options)
    fp_model, q_model = build_quant_model(adapter, model_id, recipe, dev, model_options,
                                          float_passes=lambda m: passes.run("float", m, fp_model=m))
    blocks = adapter.blocks(fp_model)
    scheduler = session.make("scheduler", recipe.scheduler)
    scheduler.bind(fp_model)
    plan = scheduler.plan(blocks)
    ckpt = checkpoint_dir(out_dir) if out_dir else None
    identity = {"model_id": absolute_spec(model_id), "model_options": dict(model_options or {}),
                "data": absolute_spec(data), "calib_samples": used, "calib_seed": recipe.calib.seed}
    if ckpt is not None:  # only a checkpoint is compared with it: hashing the calibration set costs a pass over it
        # the same spec may name other data (a folder whose images changed, a regenerated file)
        identity["calib_fingerprint"] = fingerprint(calib_inputs + calib_targets)
    run = RunContext(session, recipe, adapter, fp_model, q_model, blocks, [b[0] for b in shard],
                     [b[1] for b in shard], dev, seed=recipe.calib.seed, checkpoint_dir=ckpt, plan=plan,
                     model_id=model_id, identity=identity)
    policy = session.make("activation_policy", recipe.activation_policy)
    memory = describe_memory(run, plan, recipe.recon.cache, policy.needs_fp_inputs)
    logger.info(memory)
    if report is not None:
        report(f"{recipe.name} on {model_id}: {len(plan)} reconstruction units; {memory}")
    result = ApplyResult(recipe, model_id, out_dir, plan=[u.name for u in plan], memory=memory)
    if dry_run:
        return result

    passes.run("prepared", q_model, fp_model=fp_model)
    calibrate_weights(q_model, session, recipe)
    weights_first = recipe.recon.order == "weights_first"
    if recipe.activation is not None and not weights_first:
        calibrate_activations(q_model, adapter, calib, session, recipe, dev)
    session.pm.hook.on_run_start(run=run)
    engine = ReconstructionEngine(
        run,
        rounding=session.make("rounding", recipe.rounding),
        loss=session.make("loss", recipe.loss),
        policy=policy,
        transforms=[session.make("data_transform", t) for t in recipe.data_transforms],
        on_unit_end=lambda unit, record: session.pm.hook.on_unit_end(run=run, unit=unit, record=record),
    )
    def on_pass_start(pass_name: str) -> None:
        if pass_name == "activations":  # BRECQ: steps initialized on the weight-quantized model
            calibrate_activations(q_model, adapter, calib, session, recipe, dev, weights_quantized=True)

    records = engine.reconstruct(resume=resume, on_pass_start=on_pass_start)
    if weights_first and recipe.activation is not None and not recipe.recon.learn_act_step:
        calibrate_activations(q_model, adapter, calib, session, recipe, dev, weights_quantized=True)
    passes.run("quantized", q_model, fp_model=fp_model)
    q_model.eval()
    result.records, result.model = records, q_model
    if not is_main_process():  # every rank holds the same model: rank 0 evaluates and saves it
        result.seconds = time.perf_counter() - t0
        return result
    test_set = session.model_data(model_id, data, "test", num_samples=eval_samples, model_options=model_options)
    test = _stream(test_set, max(recipe.calib.batch_size, 64))  # read once, never held whole
    models = {"fp": fp_model, "quantized": q_model} if evaluate_fp else {"quantized": q_model}
    metrics = evaluate_together(models, adapter, test, dev, "evaluate " + " and ".join(models))
    fp_metrics, q_metrics = metrics.get("fp", {}), metrics["quantized"]
    result.fp_metrics, result.quant_metrics, result.records = fp_metrics, q_metrics, records
    result.seconds = time.perf_counter() - t0
    result.model = q_model
    result.passes = passes.summaries
    if out_dir:
        bit_map = layer_bits(q_model, adapter.quantizable_layers(fp_model))  # after any bit-allocation pass
        save_run(q_model, build_manifest(session, result, data, eval_samples, bit_map, dev, model_options), out_dir)
        remove_checkpoint(out_dir)
    session.pm.hook.on_run_end(run=run, result=result)
    return result


# schemes whose rest is a name, never a path (a directory of that name in the working directory is irrelevant)
NAME_SCHEMES = frozenset({"testing", "synthetic", "zoo", "torchvision", "fmnist", "fmnist-subset", "austen"})


def absolute_spec(spec: str) -> str:
    """``spec`` (a model id or data spec, ``SCHEME:REST[?QUERY]``) with a relative REST that names an existing
    file or directory made absolute, so a saved run can be evaluated from any directory: ``local:seq.pt`` ->
    ``local:/abs/seq.pt``, ``tensors:good.pt`` -> ``tensors:/abs/good.pt``. Hub ids (``hf:org/name`` without
    such a local directory), name schemes (``synthetic:images``, ``zoo:...``) and absolute paths are kept."""
    head, qmark, query = spec.partition("?")
    scheme, colon, rest = head.partition(":")
    if not colon or not rest or scheme in NAME_SCHEMES or os.path.isabs(rest) or not os.path.exists(rest):
        return spec
    return f"{scheme}:{os.path.abspath(rest)}{qmark}{query}"


def build_manifest(session: Session, result: ApplyResult, data: str, eval_samples: int | None,
                   bit_map: list[LayerBits], device: torch.device,
                   model_options: Mapping[str, Any] | None) -> dict[str, Any]:
    recipe = result.recipe
    providers: dict[str, str] = {}
    for kind, ref in (("observer", recipe.weight_observer), ("observer", recipe.activation_observer),
                      ("rounding", recipe.rounding), ("loss", recipe.loss), ("scheduler", recipe.scheduler),
                      ("activation_policy", recipe.activation_policy)):
        providers[f"{kind}:{ref.name}"] = session.registry(kind).entry(ref.name).provider
    versions = {p["name"]: p.get("version", "unknown") for p in session.plugin_report()}
    return {
        "model_id": absolute_spec(result.model_id),
        "model_options": dict(model_options or {}),
        "data": absolute_spec(data),
        "eval_samples": eval_samples,
        "recipe": recipe.to_dict(),
        "providers": providers,
        "versions": {k: versions.get(v, "unknown") for k, v in providers.items()},
        "seed": recipe.calib.seed,
        "plan": result.plan,
        "bit_map": [asdict(b) for b in bit_map],
        "units": [asdict(r) for r in result.records],
        "passes": result.passes,
        "metrics": {"fp": result.fp_metrics, "quant": result.quant_metrics,
                    "comparison": compare(result.fp_metrics, result.quant_metrics)},
        "wall_seconds": result.seconds,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                        "threads": torch.get_num_threads()},
    }
