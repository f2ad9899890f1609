"""Plugin authoring: ``quantplug new-plugin NAME --kind KIND [--dir DIR]``.

Writes a complete, installable plugin distribution ``quantplug-NAME``:

* ``pyproject.toml`` with the entry point ``NAME = "quantplug_NAME"`` in the group ``quantplug``;
* ``src/quantplug_NAME/__init__.py`` with a minimal working component of the kind (a rounding equal to
  round-to-nearest, a min-max observer, an MSE loss, a scheduler equal to ``block``) plus a recipe named
  NAME that uses it, or (kind ``recipe``) a recipe extending ``nearest``;
* ``tests/test_NAME.py``: the conformance class of the kind (``quantplug.testing.conformance``), the
  ``RecipeSmoke`` end-to-end check, and a check that the installed entry point registers the component;
* ``README.md`` saying what to edit, how to install, test and run it.

The package installs (``pip install ./quantplug-NAME``) and passes its own tests unchanged. The templates
are strings in this module (no package data), filled with ``string.Template``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from string import Template
from typing import Any

from quantplug import console
from quantplug.errors import ConfigError
from quantplug.hookspecs import hookimpl

logger = logging.getLogger(__name__)

#: kinds ``new-plugin`` can generate -> the registry kind of the component (None: a recipe only)
KINDS: dict[str, str | None] = {
    "rounding": "rounding",
    "observer": "observer",
    "loss": "loss",
    "scheduler": "scheduler",
    "recipe": None,
}

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
MAX_NAME_LENGTH = 40

# --------------------------------------------------------------------------- templates
_PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "$summary"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["quantplug>=$quantplug_version"]

[project.optional-dependencies]
test = ["pytest>=7"]

# the entry point quantplug discovers: <plugin name> = "<module with the @hookimpl functions>"
[project.entry-points.quantplug]
$name = "$package"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]

[tool.ruff]
line-length = 120
src = ["src"]

[tool.ruff.lint]
select = ["E", "F", "W", "I", "UP", "B"]
"""

_HEADER = '''\
"""$title

TODO: say what the method does and cite its paper (authors, title, venue, year). quantplug shows the
first line of the component's docstring in `quantplug list` and the whole of it in `quantplug show`.
"""

from __future__ import annotations

'''

_RECIPE_HOOK = '''

@hookimpl
def register_recipes(register) -> None:  # type: ignore[no-untyped-def]
    register($recipe_const)
'''

_MODULES: dict[str, str] = {
    "rounding": '''\
import torch
from quantplug import hookimpl
from quantplug.interfaces import Rounding, WeightRounder
from quantplug.quantizer import from_rows, to_rows
from quantplug.recipes import RecipeSpec
from torch import nn

__all__ = ["$recipe_const", "$rounder_cls", "$cls"]


class $rounder_cls(WeightRounder):
    """The rounding state of one quantized layer: its integer codes, computed once."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = [layer]  # a list keeps the layer out of this module's children
        spec, q = layer.weight_spec, layer.weight_quantizer
        x = to_rows(layer.weight.detach(), spec) / q.scale.detach()[:, None]  # one row per scale
        codes = torch.clamp(torch.round(x) + q.zero_point[:, None], spec.qmin, spec.qmax)  # edit this line
        self.register_buffer("codes", from_rows(codes, layer.weight.shape, spec))

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight used while the unit is reconstructed."""
        return self.layer[0].dequantize_codes(self.codes)

    def hard_codes(self) -> torch.Tensor:
        """The integer codes stored when the unit is hardened."""
        return self.codes


class $cls(Rounding):
    """$title"""

    name = "$name"

    def attach(self, layer: nn.Module, *, generator: torch.Generator | None = None) -> WeightRounder:
        return $rounder_cls(layer)


$recipe_const = RecipeSpec(
    name="$name",
    extends="nearest",
    description="Round-to-nearest PTQ with the $name rounding",
    overrides={"rounding.name": "$name"},
    source="TODO: cite the paper",
)


@hookimpl
def register_roundings(register) -> None:  # type: ignore[no-untyped-def]
    register($cls)
''',
    "observer": '''\
from typing import Any

import torch
from quantplug import hookimpl
from quantplug.config import QuantSpec
from quantplug.errors import DataError
from quantplug.interfaces import Observer
from quantplug.quantizer import qparams_from_range
from quantplug.recipes import RecipeSpec

__all__ = ["$recipe_const", "$cls"]


class $cls(Observer):
    """$title"""

    name = "$name"

    def __init__(self, spec: QuantSpec, config: Any = None) -> None:
        super().__init__(spec, config)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def observe(self, rows: torch.Tensor, batch_size: int | None = None) -> None:
        """One batch, shaped [rows, elements]: one row per scale (tensor, channel or group)."""
        rows = rows.detach().float()
        if not torch.isfinite(rows).all():
            raise DataError(f"{self.name} observer: the tensor contains NaN or inf; check the calibration data")
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point, one per row."""
        if self.min_val is None or self.max_val is None:
            raise DataError(f"{self.name} observer: compute() before observe(); run calibration data first")
        return qparams_from_range(self.min_val, self.max_val, self.spec)


$recipe_const = RecipeSpec(
    name="$name",
    extends="nearest",
    description="Round-to-nearest PTQ with the $name observer for weights and activations",
    overrides={"weight_observer.name": "$name", "activation_observer.name": "$name"},
    source="TODO: cite the paper",
)


@hookimpl
def register_observers(register) -> None:  # type: ignore[no-untyped-def]
    register($cls)
''',
    "loss": '''\
from dataclasses import dataclass

import torch
from quantplug import hookimpl
from quantplug.interfaces import LossContext, ReconstructionLoss
from quantplug.recipes import RecipeSpec

__all__ = ["$recipe_const", "$cls"]


class $cls(ReconstructionLoss):
    """$title"""

    name = "$name"

    @dataclass(frozen=True)
    class Config:
        weight: float = 1.0  # options: -o loss.options.weight=2.0

    def __call__(self, output: torch.Tensor, target: torch.Tensor, context: LossContext) -> torch.Tensor:
        """A scalar to minimize; ``context.progress`` in [0, 1] is the unit's iteration progress."""
        return self.config.weight * (output - target).square().mean()


$recipe_const = RecipeSpec(
    name="$name",
    extends="nearest-lsq",
    description="Nearest rounding, activation steps learned block by block with the $name loss",
    overrides={"loss.name": "$name"},
    presets={"cpu-fast": {"recon.iters": 300}},
    source="TODO: cite the paper",
)


@hookimpl
def register_losses(register) -> None:  # type: ignore[no-untyped-def]
    register($cls)
''',
    "scheduler": '''\
from collections.abc import Sequence

from quantplug import hookimpl
from quantplug.interfaces import GranularityScheduler, ReconUnit, UnitSpec
from quantplug.recipes import RecipeSpec

__all__ = ["$recipe_const", "$cls"]


class $cls(GranularityScheduler):
    """$title"""

    name = "$name"

    def plan(self, blocks: Sequence[UnitSpec]) -> list[ReconUnit]:
        """The units to reconstruct, in forward order; a unit holds adjacent blocks (or one layer)."""
        return [ReconUnit(b.name, blocks=(b.name,)) for b in blocks if b.layers]


$recipe_const = RecipeSpec(
    name="$name",
    extends="nearest-lsq",
    description="Nearest rounding, activation steps learned over the units of the $name scheduler",
    overrides={"scheduler.name": "$name"},
    presets={"cpu-fast": {"recon.iters": 300}},
    source="TODO: cite the paper",
)


@hookimpl
def register_schedulers(register) -> None:  # type: ignore[no-untyped-def]
    register($cls)
''',
    "recipe": '''\
from quantplug import hookimpl
from quantplug.recipes import RecipeSpec

__all__ = ["$recipe_const"]

# The settings of a method as overrides on the recipe it extends (`quantplug show recipe nearest`),
# with the paper's official values as a named preset.
OFFICIAL = {"calib.num_samples": 1024, "calib.batch_size": 64}

$recipe_const = RecipeSpec(
    name="$name",
    extends="nearest",
    description="$title",
    overrides={"weight_observer.name": "minmax", "weight.bits": 4, **OFFICIAL},
    presets={"official": OFFICIAL, "cpu-fast": {"calib.num_samples": 256}},
    source="TODO: cite the paper",
)
''',
}

_TEST_HEADER = '''\
"""Tests of $dist: the conformance suite of its kind, the recipe end to end, discovery."""

from __future__ import annotations

'''

_TESTS: dict[str, str] = {
    "rounding": '''\
from quantplug.plugins import Session
from quantplug.testing.conformance import RecipeSmoke, RoundingConformance

from $package import $cls


class Test${cls}Conformance(RoundingConformance):
    component = $cls


class Test${cls}Recipe(RecipeSmoke):
    recipe = "$name"


def test_entry_point_registers_the_rounding() -> None:
    assert Session(entry_points=True).roundings.get("$name") is $cls
''',
    "observer": '''\
from quantplug.plugins import Session
from quantplug.testing.conformance import ObserverConformance, RecipeSmoke

from $package import $cls


class Test${cls}Conformance(ObserverConformance):
    component = $cls


class Test${cls}Recipe(RecipeSmoke):
    recipe = "$name"


def test_entry_point_registers_the_observer() -> None:
    assert Session(entry_points=True).observers.get("$name") is $cls
''',
    "loss": '''\
from quantplug.plugins import Session
from quantplug.testing.conformance import LossConformance, RecipeSmoke

from $package import $cls


class Test${cls}Conformance(LossConformance):
    component = $cls


class Test${cls}Recipe(RecipeSmoke):
    recipe = "$name"


def test_entry_point_registers_the_loss() -> None:
    assert Session(entry_points=True).losses.get("$name") is $cls
''',
    "scheduler": '''\
from quantplug.plugins import Session
from quantplug.testing.conformance import RecipeSmoke, SchedulerConformance

from $package import $cls


class Test${cls}Conformance(SchedulerConformance):
    component = $cls


class Test${cls}Recipe(RecipeSmoke):
    recipe = "$name"


def test_entry_point_registers_the_scheduler() -> None:
    assert Session(entry_points=True).schedulers.get("$name") is $cls
''',
    "recipe": '''\
from quantplug.plugins import Session
from quantplug.recipes import resolve_recipe
from quantplug.testing.conformance import RecipeSmoke

from $package import $recipe_const


class Test${cls}Recipe(RecipeSmoke):
    recipe = "$name"


def test_entry_point_registers_the_recipe() -> None:
    assert Session(entry_points=True).recipes.get("$name") is $recipe_const


def test_recipe_resolves_with_its_presets() -> None:
    session = Session(entry_points=True)
    recipe = resolve_recipe(session, "$name")
    assert recipe.weight_observer.name == "minmax" and recipe.rounding.name == "nearest"
    assert resolve_recipe(session, "$name", preset="cpu-fast").calib.num_samples == 256
''',
}

_README = """\
# $dist

$title

A quantplug plugin generated by `quantplug new-plugin $name --kind $kind`.
It registers $what through the entry point `$name = "$package"` (group `quantplug`, see `pyproject.toml`).

## Use it

```bash
pip install -e .                      # quantplug discovers the plugin through its entry point
quantplug plugins                     # lists $dist and what it registers
quantplug show $show_kind $name
quantplug apply --plugin $name testing:tiny-resnet --calib-samples 64 --eval-samples 100 --no-save
python -m pytest                      # conformance suite, recipe smoke test, discovery
```

## Make it yours

$edit

* Cite the paper in the module docstring and in the recipe's `source`; put the paper's settings in a preset
  (`presets={"official": {...}}`) so `--preset official` reproduces them.
* Keep the tests: `tests/test_$module.py` subclasses the conformance class of quantplug for the kind
  (`quantplug.testing.conformance`), which checks shapes, determinism and a quality floor, and `RecipeSmoke`,
  which runs the recipe end to end on a tiny model.
* Hooks and component interfaces: `docs/hooks.md` and `docs/concepts.md` of quantplug; a walk-through of a
  complete rounding plugin: `docs/plugin-tutorial.md`.
"""

_EDIT: dict[str, str] = {
    "rounding": "Edit the line marked `edit this line` in `$rounder_cls.__init__`: it maps each weight (in units of "
                "its step, `x`) to an integer code. A learnable rounding sets `learnable = True`, keeps "
                "`nn.Parameter`s in the rounder, computes the soft weight in `forward` and may add "
                "`regularization(progress)`.",
    "observer": "Edit `observe` (statistics of each calibration batch) and `compute` (scale and zero point per row, "
                "`quantplug.quantizer.qparams_from_range` turns a clipping range into them).",
    "loss": "Edit `__call__` (output and target of the unit; per-sample tensors the loss needs are declared in "
            "`extra_keys` and captured by `capture_extras`). Options live in the frozen `Config`.",
    "scheduler": "Edit `plan`: it turns the model's blocks (`UnitSpec`: name, layers, stage) into the units "
                 "reconstructed one after another (`ReconUnit`: adjacent blocks, or a single layer).",
    "recipe": "Edit the overrides: any recipe field (`quantplug show recipe nearest` shows them all), e.g. "
              "`rounding.name`, `scheduler.name`, `recon.iters`, `weight.granularity`.",
}

_TITLES: dict[str, str] = {
    "rounding": "Round-to-nearest rounding (a starting point: edit the rounding rule).",
    "observer": "Min-max observer: running minimum and maximum of every row (a starting point).",
    "loss": "Mean squared error between the quantized unit's output and the full-precision target.",
    "scheduler": "Each block reconstructed on its own, in forward order (equal to the built-in `block`).",
    "recipe": "Round-to-nearest PTQ with min-max calibrated 4-bit weights (a starting point).",
}

_WHAT: dict[str, str] = {
    "rounding": "the rounding `$name` and the recipe `$name` that uses it",
    "observer": "the observer `$name` and the recipe `$name` that uses it",
    "loss": "the reconstruction loss `$name` and the recipe `$name` that uses it",
    "scheduler": "the granularity scheduler `$name` and the recipe `$name` that uses it",
    "recipe": "the recipe `$name`",
}


# --------------------------------------------------------------------------- generation
def validate_name(name: str) -> str:
    """Return ``name`` if it can name a plugin (``quantplug-NAME``, module ``quantplug_NAME``); else raise."""
    if name.startswith(("quantplug-", "quantplug_")):
        raise ConfigError(f"plugin name {name!r}: leave out the prefix, the distribution is named quantplug-NAME "
                          f"(e.g. quantplug new-plugin {name[len('quantplug-'):] or 'myrounding'})")
    if not NAME_PATTERN.match(name) or len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"plugin name {name!r} is not valid: use lowercase letters and digits, words joined by '-' or '_', "
            f"starting with a letter, at most {MAX_NAME_LENGTH} characters (e.g. myrounding, sign-round)"
        )
    return name


def plugin_identifiers(name: str, kind: str) -> dict[str, str]:
    """The names derived from a plugin name: distribution, package, classes, recipe constant."""
    snake = name.replace("-", "_")
    camel = "".join(part.capitalize() for part in snake.split("_"))
    suffix = {"rounding": "Rounding", "observer": "Observer", "loss": "Loss", "scheduler": "Scheduler",
              "recipe": ""}[kind]
    return {
        "name": name,
        "kind": kind,
        "dist": f"quantplug-{name}",
        "package": f"quantplug_{snake}",
        "module": snake,
        "cls": camel + suffix,
        "rounder_cls": camel + "Rounder",
        "recipe_const": snake.upper() + "_RECIPE",
        "show_kind": "recipe" if kind == "recipe" else kind,
    }


def render_plugin(name: str, kind: str) -> dict[str, str]:
    """The files of a new plugin package: relative path -> text."""
    from quantplug import __version__

    validate_name(name)
    if kind not in KINDS:
        raise ConfigError(f"unknown plugin kind {kind!r}; choose one of {', '.join(KINDS)}")
    ids = plugin_identifiers(name, kind)
    imported = set(re.findall(r"^(?:from \S+ )?import (.+)$", _MODULES[kind] + _TESTS[kind], re.M))
    imported_names = {n.strip() for line in imported for n in line.split(",")}
    for key in ("cls", "rounder_cls", "recipe_const"):
        if ids[key] in imported_names:
            raise ConfigError(f"plugin name {name!r} would name a class {ids[key]}, which shadows quantplug's "
                              f"{ids[key]}; choose another name")
    values: dict[str, str] = {**ids, "quantplug_version": __version__}
    values["title"] = Template(_TITLES[kind]).substitute(values)
    values["summary"] = f"quantplug plugin: {values['title']}".replace('"', "'")
    values["what"] = Template(_WHAT[kind]).substitute(values)
    values["edit"] = Template(_EDIT[kind]).substitute(values)
    module = Template(_HEADER).substitute(values) + Template(_MODULES[kind]).substitute(values)
    module += Template(_RECIPE_HOOK).substitute(values)
    tests = Template(_TEST_HEADER).substitute(values) + Template(_TESTS[kind]).substitute(values)
    return {
        "pyproject.toml": Template(_PYPROJECT).substitute(values),
        "README.md": Template(_README).substitute(values),
        f"src/{ids['package']}/__init__.py": module,
        f"tests/test_{ids['module']}.py": tests,
    }


def taken_names(session: Any, kind: str) -> dict[str, str]:
    """Names a new plugin of ``kind`` would collide with in ``session``: name -> provider."""
    taken: dict[str, str] = {}
    kinds = ["recipe"] + ([KINDS[kind]] if KINDS.get(kind) else [])
    for k in kinds:
        for entry in session.registry(k):
            taken[f"{k}:{entry.name}"] = entry.provider
    return taken


def write_plugin(name: str, kind: str, directory: str | os.PathLike[str] | None = None, *,
                 taken: Mapping[str, str] | None = None) -> Path:
    """Write the package of a new plugin into ``directory`` (default ``./quantplug-NAME``); returns its path.

    Refuses a directory that exists and is not empty, and a name ``taken`` (``kind:name`` -> provider) by an
    installed plugin of the same kind. Files go to a temporary sibling first, then one rename.
    """
    files = render_plugin(name, kind)
    for key, provider in (taken or {}).items():
        k, _, existing = key.partition(":")
        if existing == name and (k == "recipe" or k == KINDS[kind]):
            raise ConfigError(f"a {k} named {name!r} is already registered by {provider!r}; choose another name "
                              "(two plugins registering the same name cannot be installed together)")
    target = Path(directory) if directory is not None else Path(f"quantplug-{name}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target} already exists; choose another --dir or remove it (nothing was written)")
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".quantplug-new-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        os.replace(tmp, target)  # an empty existing directory is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s plugin %r to %s", kind, name, target)
    return target


# --------------------------------------------------------------------------- CLI: quantplug new-plugin
def cmd_new_plugin(args: argparse.Namespace) -> int:
    """``quantplug new-plugin NAME --kind KIND [--dir DIR]``: print the files written and the next steps."""
    from quantplug import cli

    validate_name(args.name)
    taken = taken_names(cli._session(), args.kind)
    target = write_plugin(args.name, args.kind, args.dir, taken=taken)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    console.out(f"created {target}/: {args.kind} plugin {args.name!r} (distribution quantplug-{args.name})")
    for f in files:
        console.out(f"  {f}")
    console.out("next:")
    console.out(f"  pip install -e {target}")
    console.out(f"  python -m pytest {target}")
    console.out(f"  quantplug apply --plugin {args.name} testing:tiny-resnet --calib-samples 64 "
                "--eval-samples 100 --no-save")
    return 0


@hookimpl
def register_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "new-plugin",
        help="write a new plugin package (pyproject with entry point, component, tests, README)",
        description="Write the package quantplug-NAME: a minimal working component of KIND, a recipe named NAME, "
                    "a conformance test and a README. It installs and passes its own tests unchanged.",
    )
    p.add_argument("name", help="plugin name: lowercase letters and digits, words joined by '-' or '_' "
                                "(the distribution is quantplug-NAME, the module quantplug_NAME)")
    p.add_argument("--kind", required=True, choices=tuple(KINDS),
                   help="component to start from: rounding (nearest), observer (min-max), loss (MSE), "
                        "scheduler (block), recipe (extends nearest)")
    p.add_argument("--dir", default=None, help="directory to create (default: ./quantplug-NAME); must not exist "
                                               "or be empty")
    p.set_defaults(func=cmd_new_plugin)


__all__ = ["KINDS", "cmd_new_plugin", "plugin_identifiers", "render_plugin", "taken_names", "validate_name",
           "write_plugin"]
