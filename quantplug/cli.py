"""The ``quantplug`` command line: apply, plugins, list, show, eval (plus commands plugins add)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from quantplug.errors import ConfigError, QuantplugError
from quantplug.progress import set_quiet

logger = logging.getLogger("quantplug")


def positive_int(text: str) -> int:
    """argparse type of a sample count: an integer of at least 1 (0 or a negative count is refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of samples, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value} (leave the option out to use all)")
    return value


def _session() -> Any:
    from quantplug.plugins import Session

    return Session()


# --------------------------------------------------------------------------- apply
def _add_apply(sub: Any) -> None:
    p = sub.add_parser(
        "apply",
        help="quantize a model with a method, compare with full precision, save the result",
        description="Quantize MODEL_ID with the recipe of --plugin; report FP vs quantized metrics; save to --out.",
    )
    p.add_argument("model_id", nargs="?", default=None,
                   help="model id with its source (testing:tiny-resnet, zoo:resnet18-fmnist, torchvision:resnet18, "
                        "hf:ORG/NAME, local:PATH); default: the embedded model")
    p.add_argument("--plugin", default="nearest", help="recipe to apply (see `quantplug list recipe`)")
    p.add_argument("--base", default=None, help="base recipe for a modifier recipe (e.g. --plugin mrecg --base qdrop)")
    p.add_argument("--preset", default=None, help="named preset of the recipe (e.g. official, cpu-fast)")
    p.add_argument("--data", default=None, help="data spec (default: the model's own default data)")
    p.add_argument("--weights", default=None, help="pretrained weights of a hub model (e.g. DEFAULT, IMAGENET1K_V1)")
    p.add_argument("--arch", default=None, help="architecture of a local state-dict file (e.g. resnet18)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of a freshly built model")
    p.add_argument("--w-bits", type=int, default=None, help="weight bits (2-8); first/last layers of a CNN stay at 8")
    p.add_argument("--a-bits", type=int, default=None,
                   help="activation bits (2-8; 0 or 32: weights only, no activation quantizers or learned steps)")
    p.add_argument("--calib-samples", type=positive_int, default=None, help="number of calibration samples (>= 1)")
    p.add_argument("--batch-size", type=int, default=None, help="reconstruction batch size")
    p.add_argument("--iters", type=int, default=None, help="reconstruction iterations per unit")
    p.add_argument("--cache", choices=("cpu", "fp16", "disk"), default=None, help="where unit inputs are cached")
    p.add_argument("--seed", type=int, default=None, help="random seed (calibration sampling, reconstruction)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    p.add_argument("--eval-samples", type=positive_int, default=None,
                   help="limit the evaluation set to N samples, N >= 1 (default: all)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="PATH=VALUE",
                   help="override any recipe field, e.g. -o recon.iters=500 -o rounding.options.reg_weight=0.1")
    p.add_argument("--out", default=None, help="output directory (default: runs/<plugin>-<model>)")
    p.add_argument("--no-save", action="store_true", help="do not save the quantized model")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the memory estimate, then stop")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_apply)


def _default_out(plugin: str, model_id: str) -> str:
    safe = model_id.replace(":", "-").replace("/", "-").strip("-.")
    return os.path.join("runs", f"{plugin}-{safe}")


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"weights": args.weights, "arch": args.arch, "num_classes": args.num_classes}
    return {k: v for k, v in options.items() if v is not None}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


#: apply's convenience flags (argparse destination -> flag); each sets recipe paths (``api.cli_overrides``)
CONVENIENCE_FLAGS = {"w_bits": "--w-bits", "a_bits": "--a-bits", "calib_samples": "--calib-samples",
                     "batch_size": "--batch-size", "iters": "--iters", "seed": "--seed", "cache": "--cache"}


def _refuse_overlap(set_by: dict[str, str], path: str, text: str) -> None:
    """A ``-o`` override may not set what a convenience flag sets (the same path, or one inside the other)."""
    for flag_path, flag in set_by.items():
        if path == flag_path or path.startswith(flag_path + ".") or flag_path.startswith(path + "."):
            raise ConfigError(f"{flag} and -o {text} both set {min(path, flag_path, key=len)}: keep only one of them")


def cmd_apply(args: argparse.Namespace) -> int:
    import torch

    from quantplug.api import apply, cli_overrides
    from quantplug.config import parse_override
    from quantplug.distributed import init_from_environment, is_main_process, shutdown

    overrides: dict[str, Any] = {}
    set_by: dict[str, str] = {}  # recipe path -> the convenience flag that sets it
    for attr, flag in CONVENIENCE_FLAGS.items():
        value = getattr(args, attr)
        if value is not None:
            paths = cli_overrides(**{attr: value})
            overrides.update(paths)
            set_by.update(dict.fromkeys(paths, f"{flag} {value}"))
    for text in args.override:
        path, value = parse_override(text)
        _refuse_overlap(set_by, path, text)
        overrides[path] = value
    session = _session()
    model_id = args.model_id or session.default_model_id()
    out = None if args.no_save or args.dry_run else (args.out or _default_out(args.plugin, model_id))
    device = init_from_environment(torch.device(args.device))  # under torchrun: one rank of a data-parallel run
    try:
        result = apply(args.plugin, model_id, data=args.data, base=args.base, preset=args.preset,
                       overrides=overrides, device=str(device), out_dir=out, eval_samples=args.eval_samples,
                       resume=args.resume, dry_run=args.dry_run, session=session,
                       report=_stderr if not (args.dry_run or args.quiet) and is_main_process() else None,
                       model_options=_model_options(args))
    finally:
        main_process = is_main_process()
        shutdown()
    if not main_process:  # rank 0 reports and saves
        return 0
    if args.dry_run:
        info = {"recipe": result.recipe.to_dict(), "plan": result.plan, "memory": result.memory,
                "model_id": model_id}
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(f"model: {model_id}\nrecipe: {result.recipe.name}\nunits ({len(result.plan)}): "
                  f"{', '.join(result.plan)}\n{result.memory}")
        return 0
    if args.json:
        print(json.dumps({"model_id": model_id, "recipe": result.recipe.name, "fp": result.fp_metrics,
                          "quant": result.quant_metrics, "out": result.out_dir, "seconds": result.seconds}, indent=2))
        return 0
    r = result.recipe
    a_bits = r.activation.bits if r.activation is not None else 32
    print(f"{r.name} on {model_id}: W{r.weight.bits}A{a_bits} ({result.seconds:.1f}s)")
    for key in result.quant_metrics:
        fp = result.fp_metrics.get(key)
        q = result.quant_metrics[key]
        fp_text = f"{fp:.2f}" if fp is not None else "n/a"
        delta = f"  ({q - fp:+.2f})" if fp is not None else ""
        print(f"  {key:<12} full precision {fp_text:>8}   quantized {q:8.2f}{delta}")
    if result.out_dir:
        print(f"saved to {result.out_dir}")
    return 0


# --------------------------------------------------------------------------- plugins / list / show
def cmd_plugins(args: argparse.Namespace) -> int:
    print(json.dumps(_session().plugin_report(), indent=2))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    session = _session()
    kinds = [args.kind] if args.kind else [k for k, _ in session.components()]
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        registry = session.registry(kind)
        out[registry.kind] = [
            {"name": e.name, "provider": e.provider, "summary": _summary(e.obj)} for e in registry
        ]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for kind, entries in out.items():
        print(f"{kind}:")
        for e in entries:
            print(f"  {e['name']:<20} {e['provider']:<26} {e['summary']}")
    return 0


def _summary(obj: Any) -> str:
    info = obj.describe() if hasattr(obj, "describe") else {}
    return str(info.get("summary", ""))


def cmd_show(args: argparse.Namespace) -> int:
    from quantplug.registry import describe_entry

    session = _session()
    entry = session.registry(args.kind).entry(args.name)
    info = describe_entry(entry)
    if args.kind == "recipe":
        from quantplug.recipes import resolve_recipe

        info["resolved"] = resolve_recipe(session, args.name, preset=args.preset).to_dict()
    print(json.dumps(info, indent=2, default=str))
    return 0


# --------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from quantplug.evaluate import evaluate
    from quantplug.export import load, read_manifest
    from quantplug.tensors import resolve_device

    device = resolve_device(args.device)  # a clear error for cuda without CUDA, before loading anything
    session = _session()
    manifest = read_manifest(args.run_dir)
    model = load(args.run_dir, device=str(device), session=session)
    adapter = session.adapter_for(manifest["model_id"])
    data = args.data or manifest["data"]
    limit = args.eval_samples if args.eval_samples is not None else manifest.get("eval_samples")
    test = session.model_data(manifest["model_id"], data, "test", num_samples=limit,
                              model_options=manifest.get("model_options"))
    loader = torch.utils.data.DataLoader(test, batch_size=64)
    metrics = evaluate(model, adapter, loader, device)
    if args.json:
        print(json.dumps({"run": args.run_dir, "data": data, "metrics": metrics}, indent=2))
    else:
        print(f"{args.run_dir} on {data}:")
        for k, v in metrics.items():
            print(f"  {k:<12} {v:.4f}")
    return 0


# --------------------------------------------------------------------------- parser
def _global_options(in_subcommand: bool) -> argparse.ArgumentParser:
    """--debug, --verbose and --quiet, accepted before the command and after it.

    After the command their default is "not given" (SUPPRESS), so a flag given before it is kept."""
    parser = argparse.ArgumentParser(add_help=False)
    default: Any = argparse.SUPPRESS if in_subcommand else False
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log progress messages")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bars; log only warnings and errors")
    return parser


def _with_global_options(sub: Any) -> None:
    """Every subcommand, plugins' included, gets the global options (``quantplug apply ... --debug``)."""
    add_parser = sub.add_parser
    common = _global_options(in_subcommand=True)

    def add_parser_with_globals(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs["parents"] = [*kwargs.get("parents", ()), common]
        return add_parser(name, **kwargs)  # type: ignore[no-any-return]

    sub.add_parser = add_parser_with_globals


def build_parser(session_commands: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantplug", description="Post-training quantization, every method a plugin.",
                                     parents=[_global_options(in_subcommand=False)])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _with_global_options(sub)
    _add_apply(sub)
    p = sub.add_parser("plugins", help="list installed plugins and what they register (JSON)")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("list", help="list registered components of a kind (or of every kind)")
    p.add_argument("kind", nargs="?", default=None,
                   help="observer, rounding, loss, scheduler, activation_policy, data_transform, recipe, "
                        "model_adapter, data_source, exporter")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", help="describe one component (options, defaults, source)")
    p.add_argument("kind")
    p.add_argument("name")
    p.add_argument("--preset", default=None, help="for recipes: resolve with this preset")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("eval", help="evaluate a saved run directory")
    p.add_argument("run_dir")
    p.add_argument("--data", default=None, help="data spec (default: the run's data)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    p.add_argument("--eval-samples", type=positive_int, default=None,
                   help="limit the evaluation set, N >= 1 (default: the run's limit, else all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    if session_commands:
        _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: Any) -> None:
    try:
        session = _session()
    except QuantplugError:
        return
    session.pm.hook.register_commands(subparsers=sub)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = args.debug
        quiet = args.quiet and not debug
        level = logging.DEBUG if debug else logging.INFO if args.verbose and not quiet else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        set_quiet(quiet)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        notes = getattr(exc, "__notes__", None)  # apply notes whether a checkpoint can be resumed
        print(f"quantplug: interrupted; {notes[-1]}" if notes else "quantplug: interrupted", file=sys.stderr)
        return 130
    except (QuantplugError, FileNotFoundError) as exc:
        if debug:
            raise
        print(f"quantplug: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (``quantplug plugins | head``): nothing failed here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the flush at exit fails again
        return 0
    except Exception as exc:  # unexpected: still one line unless --debug
        if debug:
            raise
        print(f"quantplug: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
