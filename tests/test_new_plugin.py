"""``quantplug new-plugin``: the generated package of every kind is complete, works, installs and passes its tests."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from quantplug import cli, plugins
from quantplug.builtins import authoring
from quantplug.config import PerChannel, PerGroup, QuantSpec
from quantplug.errors import ConfigError
from quantplug.modules import QuantLinear
from quantplug.plugins import Session
from quantplug.quantizer import to_rows
from quantplug.recipes import resolve_recipe

KINDS = list(authoring.KINDS)
#: the hook through which each generated kind registers its component (every kind also registers a recipe)
KIND_HOOKS = {
    "rounding": "register_roundings",
    "observer": "register_observers",
    "loss": "register_losses",
    "scheduler": "register_schedulers",
    "recipe": "register_recipes",
}


def plugin_name(kind: str) -> str:
    return f"qpgen-{kind}"


@pytest.fixture
def builtin_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI with built-ins only, and new-plugin even before BUILTIN_MODULES lists its module."""
    monkeypatch.setenv("QUANTPLUG_LOAD_PLUGINS", "")
    if authoring.__name__ not in plugins.BUILTIN_MODULES:
        monkeypatch.setattr(plugins, "BUILTIN_MODULES", (*plugins.BUILTIN_MODULES, authoring.__name__))


def import_generated(directory: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    package = authoring.plugin_identifiers(plugin_name(kind), kind)["package"]
    monkeypatch.syspath_prepend(str(directory / "src"))
    monkeypatch.delitem(sys.modules, package, raising=False)
    module = importlib.import_module(package)
    monkeypatch.setitem(sys.modules, package, module)
    return module


def calibrated_linear(spec: QuantSpec) -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(32, 8), spec, None)
    from quantplug.builtins.observers import MinMaxObserver

    obs = MinMaxObserver(spec)
    obs.observe(to_rows(layer.weight.detach(), spec))
    layer.weight_quantizer.set_qparams(*obs.compute())
    return layer


# --------------------------------------------------------------------------- fast checks
@pytest.mark.parametrize("kind", KINDS)
def test_generated_files_and_entry_point(kind: str, tmp_path: Path) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    name = plugin_name(kind)
    target = authoring.write_plugin(name, kind, tmp_path / "pkg")
    ids = authoring.plugin_identifiers(name, kind)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == sorted(["pyproject.toml", "README.md", f"src/{ids['package']}/__init__.py",
                            f"tests/test_{ids['module']}.py"])
    project = tomllib.loads((target / "pyproject.toml").read_text())
    assert project["project"]["name"] == f"quantplug-{name}"
    assert project["project"]["entry-points"]["quantplug"] == {name: ids["package"]}
    assert any(d.startswith("quantplug") for d in project["project"]["dependencies"])
    readme = (target / "README.md").read_text()
    assert f"quantplug apply --plugin {name}" in readme and "pip install" in readme
    test_source = (target / f"tests/test_{ids['module']}.py").read_text()
    assert "RecipeSmoke" in test_source and "Session(entry_points=True)" in test_source
    if kind != "recipe":
        assert f"{kind.capitalize()}Conformance" in test_source
    for path in target.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")
    if shutil.which("ruff"):  # the package is lint-clean under its own pyproject's settings
        proc = subprocess.run(["ruff", "check", "--no-cache", "."], cwd=target, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_generated_module_registers_a_working_component(kind: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    name = plugin_name(kind)
    module = import_generated(authoring.write_plugin(name, kind, tmp_path / "pkg"), kind, monkeypatch)
    session = Session(entry_points=False, plugins=[module])
    hook = KIND_HOOKS[kind]
    assert module.__name__ in [i.plugin_name for i in getattr(session.pm.hook, hook).get_hookimpls()]
    assert session.recipes.entry(name).provider == module.__name__
    recipe = resolve_recipe(session, name)
    spec = QuantSpec(4, False, PerChannel(0))
    if kind == "rounding":  # round-to-nearest
        cls = session.roundings.get(name)
        assert recipe.rounding.name == name
        for s in (spec, QuantSpec(3, True, PerGroup(8))):
            layer = calibrated_linear(s)
            rounder = cls().attach(layer)
            assert torch.equal(rounder.hard_codes(), layer.nearest_codes())
            assert torch.equal(rounder(), layer.dequantize_codes(layer.nearest_codes()))
    elif kind == "observer":  # min-max
        from quantplug.builtins.observers import MinMaxObserver

        cls = session.observers.get(name)
        assert recipe.weight_observer.name == name and recipe.activation_observer.name == name
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
        ours, ref = cls(spec), MinMaxObserver(spec)
        for chunk in (x[:, :32], x[:, 32:]):
            ours.observe(to_rows(chunk, spec))
            ref.observe(to_rows(chunk, spec))
        for a, b in zip(ours.compute(), ref.compute()):
            assert torch.allclose(a, b)
    elif kind == "loss":  # MSE
        from quantplug.interfaces import LossContext

        cls = session.losses.get(name)
        assert recipe.loss.name == name and recipe.recon.iters > 0
        out, target = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
        assert float(cls()(out, target, LossContext())) == pytest.approx(float((out - target).square().mean()))
    elif kind == "scheduler":  # equal to block
        from quantplug.testing.models import tiny_decoder, tiny_resnet

        cls = session.schedulers.get(name)
        assert recipe.scheduler.name == name and recipe.recon.iters > 0
        for model in (tiny_resnet(), tiny_decoder()):
            blocks = model.quant_blocks()
            assert cls().plan(blocks) == session.schedulers.get("block")().plan(blocks)
    else:  # a recipe extending nearest
        assert session.recipes.get(name).extends == "nearest"
        assert recipe.rounding.name == "nearest" and recipe.weight_observer.name == "minmax"
        assert resolve_recipe(session, name, preset="cpu-fast").calib.num_samples == 256


@pytest.mark.parametrize("bad", ["", "Foo", "my plugin", "1abc", "foo-", "foo--bar", "foo.bar", "x" * 41, "é"])
def test_invalid_names_are_refused_with_a_clear_error(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid: use lowercase letters"):
        authoring.write_plugin(bad, "rounding", tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_name_with_the_quantplug_prefix_says_to_drop_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="leave out the prefix.*new-plugin myround"):
        authoring.write_plugin("quantplug-myround", "rounding", tmp_path / "pkg")


def test_existing_directory_is_never_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        authoring.write_plugin("myround", "rounding", target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        authoring.write_plugin("myround", "rounding", tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (authoring.write_plugin("myround", "rounding", empty) / "pyproject.toml").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".quantplug-new-")]


def test_name_whose_class_would_shadow_an_import_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shadows quantplug's WeightRounder"):
        authoring.write_plugin("weight", "rounding", tmp_path / "pkg")


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown plugin kind 'exporter'"):
        authoring.write_plugin("myexp", "exporter", tmp_path / "pkg")


def test_cli_writes_the_package_and_prints_next_steps(tmp_path: Path, builtin_cli: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "quantplug-myround"
    assert cli.main(["new-plugin", "myround", "--kind", "rounding", "--dir", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"created {target}/" in out and "src/quantplug_myround/__init__.py" in out
    assert f"pip install -e {target}" in out and "quantplug apply --plugin myround" in out
    assert (target / "tests/test_myround.py").is_file()


def test_cli_default_directory_and_errors(tmp_path: Path, builtin_cli: None, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["new-plugin", "my_loss", "--kind", "loss"]) == 0
    assert (tmp_path / "quantplug-my_loss/src/quantplug_my_loss/__init__.py").is_file()
    capsys.readouterr()
    assert cli.main(["new-plugin", "my_loss", "--kind", "loss"]) == 2  # directory exists
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["new-plugin", "Bad Name", "--kind", "loss"]) == 2
    assert "not valid" in capsys.readouterr().err
    # a name an installed component of the same kind already has would clash when both are installed
    assert cli.main(["new-plugin", "nearest", "--kind", "rounding"]) == 2
    err = capsys.readouterr().err
    assert "already registered by 'quantplug'" in err and not (tmp_path / "quantplug-nearest").exists()
    with pytest.raises(SystemExit):
        cli.main(["new-plugin", "x", "--kind", "exporter"])  # argparse: invalid choice


# --------------------------------------------------------------------------- install and run its own tests
@pytest.mark.slow
def test_generated_packages_install_and_pass_their_own_tests(tmp_path: Path) -> None:
    """Each kind: pip-install the package (into a private --target directory, so the environment of the
    running test session is left untouched and nothing needs uninstalling), then run `python -m pytest DIR`."""
    dirs = {kind: authoring.write_plugin(plugin_name(kind), kind, tmp_path / f"quantplug-{plugin_name(kind)}")
            for kind in KINDS}
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), *map(str, dirs.values())],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dist_infos = sorted(p.name for p in site.glob("*.dist-info"))
    assert len(dist_infos) == len(KINDS), dist_infos
    env = {**os.environ, "QUANTPLUG_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    env["QUANTPLUG_LOAD_PLUGINS"] = ",".join(plugin_name(k) for k in KINDS)  # not whatever else is installed
    failures = []
    for kind, directory in dirs.items():
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)],
                             cwd=directory, env=env, capture_output=True, text=True, timeout=900)
        summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
        if run.returncode != 0 or not re.search(r"\d+ passed", summary) or "skipped" in summary:
            failures.append(f"{kind}: exit {run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}")
    assert not failures, "\n\n".join(failures)
