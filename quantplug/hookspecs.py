"""The hook specifications: the whole contract between quantplug and its plugins.

Two families of hooks:

* ``register_*`` hooks run once per session. Each receives a ``register`` callable and calls it
  with component classes (or, for recipes, ``RecipeSpec`` objects). After registration the engine
  calls the component objects directly; no hook is called inside the reconstruction loop.
* Event hooks (``on_run_start``, ``on_unit_end``, ``on_run_end``) fire a few times per run.

Implement any subset in a module or object decorated with ``quantplug.hookimpl`` and expose it
through the entry-point group ``quantplug``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "quantplug"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[Any], None]


@hookspec
def register_observers(register: Register) -> None:
    """Register ``Observer`` subclasses (scale / zero-point estimators): ``register(MyObserver)``."""


@hookspec
def register_roundings(register: Register) -> None:
    """Register ``Rounding`` subclasses (how weights land on the grid): ``register(MyRounding)``."""


@hookspec
def register_losses(register: Register) -> None:
    """Register ``ReconstructionLoss`` subclasses (reconstruction objectives): ``register(MyLoss)``."""


@hookspec
def register_schedulers(register: Register) -> None:
    """Register ``GranularityScheduler`` subclasses (which units are reconstructed together)."""


@hookspec
def register_activation_policies(register: Register) -> None:
    """Register ``ActivationPolicy`` subclasses (which activations are quantized during reconstruction)."""


@hookspec
def register_data_transforms(register: Register) -> None:
    """Register ``DataTransform`` subclasses (changes to calibration inputs before a unit is reconstructed)."""


@hookspec
def register_recipes(register: Register) -> None:
    """Register ``RecipeSpec`` objects: a paper's method as one component per slot plus presets."""


@hookspec
def register_model_adapters(register: Register) -> None:
    """Register ``ModelAdapter`` subclasses (load a model family; its blocks, forward, loss, metrics)."""


@hookspec
def register_data_sources(register: Register) -> None:
    """Register ``DataSource`` subclasses (calibration and evaluation data from a spec string)."""


@hookspec
def register_exporters(register: Register) -> None:
    """Register ``Exporter`` subclasses (deployable artifacts written from a quantized run)."""


@hookspec
def register_model_passes(register: Register) -> None:
    """Register ``ModelPass`` subclasses (whole-model steps at a run stage: equalize, allocate bits, fine-tune)."""


@hookspec
def register_commands(subparsers: Any) -> None:
    """Add sub-commands to the ``quantplug`` CLI: ``subparsers`` is an ``argparse`` sub-parser action.

    Set ``func`` with ``parser.set_defaults(func=callable)``; it receives the parsed namespace and
    returns an exit code.
    """


@hookspec
def on_run_start(run: Any) -> None:
    """A run is about to calibrate and reconstruct; ``run`` is the ``RunContext`` (recipe, model, plan)."""


@hookspec
def on_unit_end(run: Any, unit: Any, record: Any) -> None:
    """A reconstruction unit was hardened; ``record`` holds its losses and wall time."""


@hookspec
def on_run_end(run: Any, result: Any) -> None:
    """A run finished; ``result`` holds metrics and the output directory (None if not saved)."""
