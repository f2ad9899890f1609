"""Keep docs/ true: hooks documented with their exact signatures and tested, generated pages up to date,
the examples of hooks.md working, the tutorial's code equal to the tutorial plugin, the quickstart runnable.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import inspect
import os
import re
import shlex
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from quantplug import cli, hookspecs, plugins
from quantplug.api import apply
from quantplug.export import load
from quantplug.interfaces import LossContext
from quantplug.plugins import REGISTER_HOOKS, Session
from quantplug.testing.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUN_MARKER = "<!-- run -->"
EXAMPLE_MARKER = "<!-- example -->"


# --------------------------------------------------------------------------- helpers
def load_gen_docs() -> types.ModuleType:
    return load_script(DOCS / "gen_docs.py")


def hookspec_functions() -> dict[str, Callable[..., Any]]:
    """Every hook spec of quantplug/hookspecs.py, in source order."""
    found = [f for _, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(f, f"{hookspecs.PROJECT_NAME}_spec")]
    found.sort(key=lambda f: inspect.getsourcelines(f)[1])
    return {f.__name__: f for f in found}


def _annotation(value: Any) -> str:
    return value if isinstance(value, str) else inspect.formatannotation(value)


def hook_signature(func: Callable[..., Any]) -> str:
    """``name(arg: Annotation, ...) -> Return`` exactly as written in hookspecs.py."""
    sig = inspect.signature(func)
    params = ", ".join(p.name if p.annotation is p.empty else f"{p.name}: {_annotation(p.annotation)}"
                       for p in sig.parameters.values())
    ret = "" if sig.return_annotation is sig.empty else f" -> {_annotation(sig.return_annotation)}"
    return f"{func.__name__}({params}){ret}"


def markdown_sections(text: str, level: str = "## ") -> dict[str, str]:
    """Heading (without the #s and backticks) -> the text up to the next heading of the same level."""
    sections: dict[str, str] = {}
    parts = re.split(rf"^{re.escape(level)}(.+)$", text, flags=re.M)
    for title, body in zip(parts[1::2], parts[2::2]):
        sections[title.strip().strip("`")] = body
    return sections


def fenced_blocks(text: str, marker: str | None = None, lang: str | None = None) -> list[str]:
    """Code blocks of ``text`` (in order); with ``marker``, only those right after that line."""
    pattern = re.compile(r"(?:^(?P<marker><!--[^\n]*-->)\n)?^```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.M | re.S)
    out = []
    for m in pattern.finditer(text):
        if marker is not None and (m.group("marker") or "").strip() != marker:
            continue
        if lang is not None and m.group("lang") != lang:
            continue
        out.append(m.group("body"))
    return out


def example_module(hook: str) -> types.ModuleType:
    """The example of ``hook`` in docs/hooks.md, executed as a module named ``hooks_md_<hook>``."""
    section = markdown_sections((DOCS / "hooks.md").read_text())[hook]
    blocks = fenced_blocks(section, EXAMPLE_MARKER, "python")
    assert len(blocks) == 1, f"docs/hooks.md: the {hook} section needs exactly one {EXAMPLE_MARKER} python block"
    module = types.ModuleType(f"hooks_md_{hook}")
    sys.modules[module.__name__] = module  # dataclasses and pickling look classes up by module
    exec(compile(blocks[0], f"docs/hooks.md ({hook} example)", "exec"), module.__dict__)
    return module


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> dict[str, types.ModuleType]:
    mods = {hook: example_module(hook) for hook in hookspec_functions()}
    for mod in mods.values():
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mods


# --------------------------------------------------------------------------- hooks.md
def test_every_hookspec_is_documented_with_its_exact_signature() -> None:
    sections = markdown_sections((DOCS / "hooks.md").read_text())
    specs = hookspec_functions()
    assert specs, "no hook specs found in quantplug/hookspecs.py"
    missing = [name for name in specs if name not in sections]
    stale = [name for name in sections if name.isidentifier() and name not in specs]
    assert not missing, f"docs/hooks.md has no '## name' section for hooks {missing}"
    assert not stale, f"docs/hooks.md documents hooks that do not exist: {stale}"
    for name, func in specs.items():
        signature = hook_signature(func)
        blocks = [b.strip() for b in fenced_blocks(sections[name], lang="python")]
        assert signature in blocks, f"docs/hooks.md, section {name}: the signature must read exactly `{signature}`"
        assert "**When:**" in sections[name], f"docs/hooks.md, section {name}: say when the hook fires"


def test_every_hook_is_named_in_a_test() -> None:
    """datasette-style: adding a hook without a test (under tests/) fails here."""
    sources = {p.name: p.read_text() for p in (ROOT / "tests").glob("*.py")}
    untested = [name for name in hookspec_functions()
                if not any(re.search(rf"\b{name}\b", text) for text in sources.values())]
    assert not untested, f"hooks without a test under tests/: {untested}"


@pytest.mark.parametrize("hook", sorted(REGISTER_HOOKS))
def test_register_hook_example_registers_its_component(hook: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = example_module(hook)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    session = Session(entry_points=False, plugins=[module])
    attr, base = REGISTER_HOOKS[hook]
    entries = [e for e in getattr(session, attr) if e.provider == module.__name__]
    assert entries, f"the {hook} example of docs/hooks.md registered nothing"
    for entry in entries:
        assert entry.name == entry.name.lower()
        if isinstance(entry.obj, type):  # component classes: options build, docstring present
            entry.obj.make_config({})
            assert (entry.obj.__doc__ or "").strip()


def test_hooks_md_examples_work_together_in_a_run(examples: dict[str, types.ModuleType], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One run through every example: model adapter, data source, recipe, observer, rounding, loss, scheduler,
    activation policy, data transform, then the event hooks and the exporter."""
    monkeypatch.chdir(tmp_path)
    session = Session(entry_points=False, plugins=list(examples.values()))
    fired: list[tuple[str, list[str]]] = []
    session.pm.add_hookcall_monitoring(lambda name, impls, kwargs: fired.append((name, [i.plugin_name for i in impls])),
                                       lambda outcome, name, impls, kwargs: None)
    # register_model_adapters / register_data_sources: the example adapter and data source serve the run
    assert session.adapter_for("mlp:32").name == "mlp"
    assert session.data_source_for("noise:3x16x16").name == "noise"
    overrides = {
        "weight_observer.name": "absmax", "rounding.name": "floor", "loss.name": "huber",
        "scheduler.name": "pairs", "activation_policy.name": "fp-inputs",
        "data_transforms": [{"name": "clip-outliers", "options": {"k": 4.0}}],
        "passes": [{"name": "count-levels"}],
        "recon.learn_act_step": True, "recon.iters": 3, "calib.num_samples": 32, "calib.batch_size": 16,
        "bits.first_layer_bits": None,  # the hidden layer takes the recipe's 3 bits (the head stays at 8)
    }
    result = apply("nearest-w3", "mlp:32", data="noise:3x16x16", overrides=overrides, eval_samples=32,
                   out_dir=str(tmp_path / "run"), session=session)
    r = result.recipe
    assert (r.weight.bits, r.weight_observer.name, r.rounding.name, r.loss.name, r.scheduler.name) == (
        3, "absmax", "floor", "huber", "pairs")
    assert r.activation_policy.name == "fp-inputs" and r.data_transforms[0].name == "clip-outliers"
    assert result.plan == ["flatten+hidden", "head"]  # register_schedulers: the pairs example planned it
    # register_model_passes: the count-levels pass ran after reconstruction; 3-bit weights use <= 8 levels
    levels = result.passes["count-levels"]["levels"]
    assert 1 < levels["1.0"] <= 8 and levels["2"] > 8  # the hidden layer at 3 bits, the head at 8
    assert all(rec.iters == 3 for rec in result.records)
    # the event hooks fired with the examples' implementations
    for event in ("on_run_start", "on_unit_end", "on_run_end"):
        assert any(name == event and f"hooks_md_{event}" in impls for name, impls in fired), event
    with open(tmp_path / "quantplug-runs.csv") as f:  # on_run_end example: one CSV row per metric
        rows = list(csv.DictReader(f))
    assert rows and rows[0]["recipe"] == "nearest-w3" and rows[0]["model"] == "mlp:32"
    # register_exporters: the npz example exports the hardened run
    model = load(str(tmp_path / "run"), session=session)
    exporter = session.exporters.get("npz")()
    info = exporter.export(model, str(tmp_path / "run"), str(tmp_path / "npz"))
    import numpy as np

    arrays = np.load(tmp_path / "npz" / "weights.npz")
    assert {"1.0.codes", "2.codes", "1.0.scale"} <= set(arrays.files) and info["files"]["weights.npz"] > 0
    assert int(arrays["1.0.codes"].max()) <= 7  # 3-bit weights (the recipe example) stay on their grid


def test_activation_policy_example_feeds_full_precision_inputs(examples: dict[str, types.ModuleType]) -> None:
    session = Session(entry_points=False, plugins=[examples["register_activation_policies"]])
    policy = session.activation_policies.get("fp-inputs")()
    assert policy.needs_fp_inputs
    q, fp = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(policy.mix_unit_input(q, fp), fp) and torch.equal(policy.mix_unit_input(q, None), q)


def test_loss_and_transform_examples_compute_what_they_say(examples: dict[str, types.ModuleType]) -> None:
    session = Session(entry_points=False, plugins=[examples["register_losses"], examples["register_data_transforms"]])
    huber = session.losses.get("huber")()
    out, target = torch.tensor([0.5, 3.0]), torch.zeros(2)
    assert float(huber(out, target, LossContext())) == pytest.approx((0.125 + 2.5) / 2)
    clip = session.data_transforms.get("clip-outliers")(session.data_transforms.get("clip-outliers").make_config(
        {"k": 1.0}))
    x = torch.tensor([-10.0, 0.0, 10.0])
    assert clip.apply(None, None, x).abs().max() == pytest.approx(float(x.std()))


def test_command_example_adds_a_working_subcommand(examples: dict[str, types.ModuleType],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser(session_commands=False)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    session = Session(entry_points=False, plugins=[examples["register_commands"]])
    session.pm.hook.register_commands(subparsers=sub)
    args = parser.parse_args(["count", "rounding"])
    monkeypatch.setenv("QUANTPLUG_LOAD_PLUGINS", "")
    assert args.func(args) == 0
    assert re.match(r"rounding\s+\d+", capsys.readouterr().out)


# --------------------------------------------------------------------------- generated pages
def test_cli_md_is_generated_from_the_current_help() -> None:
    expected = load_gen_docs().render_cli()
    actual = (DOCS / "cli.md").read_text()
    assert actual == expected, "docs/cli.md is out of date: run python docs/gen_docs.py"


def test_recipes_md_is_generated_from_the_registry() -> None:
    gen = load_gen_docs()
    installed = {ep.name for ep in md.entry_points(group=plugins.ENTRY_POINT_GROUP)}
    missing = [n for n in gen.repo_entry_points() if n not in installed]
    if missing:
        pytest.skip(f"plugins of requirements-dev.txt not installed: {missing}; pip install -r requirements-dev.txt")
    actual = (DOCS / "recipes.md").read_text()
    assert actual == gen.render_recipes(), "docs/recipes.md is out of date: run python docs/gen_docs.py"


def test_cli_md_covers_every_subcommand() -> None:
    gen = load_gen_docs()
    with gen.docs_environment():
        parser = cli.build_parser()
    sections = markdown_sections((DOCS / "cli.md").read_text())
    commands = list(gen._subparsers(parser))
    assert {"apply", "report", "new-plugin", "export"} <= set(commands)
    assert [s for s in sections if s != "quantplug"] == [f"quantplug {c}" for c in commands]


# --------------------------------------------------------------------------- tutorial
@pytest.mark.parametrize("marker", ["file", "excerpt"])
def test_tutorial_code_is_the_tutorial_plugin(marker: str) -> None:
    text = (DOCS / "plugin-tutorial.md").read_text()
    found = re.findall(rf"^<!-- {marker}: (\S+) -->\n```\w*\n(.*?)^```$", text, re.M | re.S)
    assert found, f"docs/plugin-tutorial.md has no <!-- {marker}: PATH --> blocks"
    for path, body in found:
        source = (ROOT / path).read_text()
        if marker == "file":
            assert body == source, f"docs/plugin-tutorial.md shows {path} differently from the file"
        else:
            assert body in source, f"docs/plugin-tutorial.md quotes lines that are not in {path}:\n{body}"


def test_tutorial_module_is_about_forty_lines_of_code() -> None:
    source = (DOCS / "tutorial/quantplug-signround/src/quantplug_signround/__init__.py").read_text()
    body = source.split('"""', 2)[2]  # after the module docstring
    code_lines = [line for line in body.splitlines() if line.strip()]
    assert 30 <= len(code_lines) <= 50, len(code_lines)


def test_tutorial_check_script_installs_tests_and_applies() -> None:
    script = (DOCS / "tutorial/check.sh").read_text()
    assert "pip install" in script and "quantplug-signround" in script and "pytest" in script
    assert ("quantplug apply --plugin signround testing:tiny-resnet --calib-samples 64 --eval-samples 100 "
            "--no-save") in script
    assert os.access(DOCS / "tutorial/check.sh", os.X_OK)


# --------------------------------------------------------------------------- quickstart and CLI lines in docs
def quantplug_command_lines(text: str) -> list[str]:
    lines = []
    for block in fenced_blocks(text, lang="bash"):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            for part in re.split(r"\s*&&\s*|\s*;\s*", line):
                if part.startswith("quantplug "):
                    lines.append(part.split(" > ", 1)[0])
    return lines


@pytest.mark.parametrize("page", ["quickstart.md", "concepts.md", "plugin-tutorial.md", "hooks.md"])
def test_quantplug_commands_in_docs_parse(page: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every `quantplug ...` line of a bash block uses a real sub-command and real options."""
    gen = load_gen_docs()
    with gen.docs_environment():
        parser = cli.build_parser()
    for line in quantplug_command_lines((DOCS / page).read_text()):
        argv = shlex.split(line)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"docs/{page}: `{line}` does not parse: {capsys.readouterr().err}")


def test_quickstart_starts_with_the_readme_commands() -> None:
    readme = fenced_blocks((ROOT / "README.md").read_text(), lang="bash")[0]
    quickstart = fenced_blocks((DOCS / "quickstart.md").read_text(), lang="bash")[0]
    assert quickstart == readme, "docs/quickstart.md must show the README's two commands exactly"


def test_quickstart_has_runnable_blocks() -> None:
    blocks = fenced_blocks((DOCS / "quickstart.md").read_text(), RUN_MARKER, "bash")
    assert len(blocks) >= 4
    assert any("quantplug apply" in b for b in blocks) and any("quantplug report" in b for b in blocks)


def _shim_for_unregistered_command_modules(tmp_path: Path) -> str | None:
    """A directory whose entry points add the command modules BUILTIN_MODULES does not list yet (else None).

    Subprocesses cannot be monkeypatched; an entry-point shim is how a plugin would add the commands anyway.
    It becomes unused once quantplug.plugins.BUILTIN_MODULES lists the modules.
    """
    gen = load_gen_docs()
    pending = [m for m in gen.COMMAND_MODULES if m not in plugins.BUILTIN_MODULES]
    if not pending:
        return None
    site = tmp_path / "shim-site"
    dist = site / "quantplug_docs_shim-0.0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: quantplug-docs-shim\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(
        "[quantplug]\n" + "".join(f"{m.rsplit('.', 1)[1]} = {m}\n" for m in pending))
    return str(site)


@pytest.mark.slow
def test_quickstart_runnable_blocks_run(tmp_path: Path) -> None:
    """Every ```bash block after `<!-- run -->` in docs/quickstart.md runs, in order, in an empty directory."""
    blocks = fenced_blocks((DOCS / "quickstart.md").read_text(), RUN_MARKER, "bash")
    work = tmp_path / "work"
    work.mkdir()
    gen = load_gen_docs()
    # the repository's plugins (requirements-dev.txt), not whatever else happens to be installed
    env = {**os.environ, "QUANTPLUG_PROGRESS": "0", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "QUANTPLUG_LOAD_PLUGINS": ",".join(gen.repo_entry_points())}
    env.pop("QUANTPLUG_DISABLE_PLUGINS", None)
    shim = _shim_for_unregistered_command_modules(tmp_path)
    if shim:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (shim, env.get("PYTHONPATH")) if p)
        env["QUANTPLUG_LOAD_PLUGINS"] += "," + ",".join(m.rsplit(".", 1)[1] for m in gen.COMMAND_MODULES)
    for i, block in enumerate(blocks):
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (f"docs/quickstart.md runnable block {i + 1} failed:\n{block}\n"
                                      f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    assert (work / "runs/first/quantplug.json").is_file() and (work / "runs/lsq/quantplug.json").is_file()
    assert (work / "runs/first/losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "runs/first-int/model.packed.safetensors").is_file()
