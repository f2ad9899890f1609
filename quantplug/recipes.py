"""Recipe specs: a paper's method as overrides on a base recipe, with named presets.

A ``RecipeSpec`` is what plugins register. Resolving it walks its ``extends`` chain from the host
defaults (``Recipe()``), applying each spec's overrides, then the chosen preset, then the user's
``-o path=value`` overrides. ``--base`` swaps the spec's own base, so a modifier recipe such as
MRECG composes with either BRECQ or QDrop. A spec with ``adds_passes`` (a model pass that composes with any
base, such as ``mixed``) adds its ``passes`` to those of its base instead of replacing them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quantplug.config import Recipe, apply_overrides
from quantplug.errors import ConfigError

if TYPE_CHECKING:
    from quantplug.plugins import Session


@dataclass(frozen=True)
class RecipeSpec:
    """A named method: overrides on ``extends`` plus presets (e.g. ``official`` and ``cpu-fast``).

    ``adds_passes``: the ``passes`` this recipe sets (in ``overrides``, a preset or the user's overrides) are added
    to the passes of the recipe it sits on (``extends`` or ``--base``) instead of replacing them. A base pass of
    the same name is replaced (that is how options change); the recipe's own passes come first, so within a stage
    they run before the base's passes (``quantplug.passes.ModelPasses`` runs the passes stage by stage, in list order).
    """

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    extends: str | None = None
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    default_preset: str | None = None
    description: str = ""
    source: str = ""
    adds_passes: bool = False

    kind = "recipe"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "recipe",
            "name": self.name,
            "summary": self.description,
            "extends": self.extends,
            "overrides": dict(self.overrides),
            "presets": {k: dict(v) for k, v in self.presets.items()},
            "default_preset": self.default_preset,
            "source": self.source,
            "adds_passes": self.adds_passes,
        }


def resolve_recipe(
    session: Session,
    name: str,
    *,
    base: str | None = None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Recipe:
    """Resolve ``name`` (optionally on top of ``base``) into a full ``Recipe``."""
    spec = session.recipes.get(name)
    recipe = _resolve_chain(session, spec, base_override=base, seen=())
    chosen = preset or spec.default_preset
    if chosen is not None:
        if chosen not in spec.presets:
            raise ConfigError(
                f"recipe {name!r} has no preset {chosen!r}; presets: {', '.join(sorted(spec.presets)) or 'none'}"
            )
        recipe = _apply(recipe, spec, spec.presets[chosen])
    if overrides:
        recipe = _apply(recipe, spec, overrides)
    full_name = name if base is None else f"{name}+{base}"
    return dataclasses.replace(recipe, name=full_name)


def _resolve_chain(session: Session, spec: RecipeSpec, *, base_override: str | None, seen: tuple[str, ...]) -> Recipe:
    if spec.name in seen:
        raise ConfigError(f"recipe {spec.name!r} extends itself through {' -> '.join(seen)}")
    parent_name = base_override or spec.extends
    if parent_name is None:
        recipe = Recipe()
    else:
        parent = session.recipes.get(parent_name)
        recipe = _resolve_chain(session, parent, base_override=None, seen=(*seen, spec.name))
        if parent.default_preset:
            recipe = apply_overrides(recipe, parent.presets[parent.default_preset])
    recipe = _apply(recipe, spec, spec.overrides)
    if spec.source:
        recipe = dataclasses.replace(recipe, source=spec.source)
    return recipe


def _apply(recipe: Recipe, spec: RecipeSpec, overrides: Mapping[str, Any]) -> Recipe:
    """``overrides`` on ``recipe``; with ``spec.adds_passes``, their ``passes`` go in front of ``recipe``'s."""
    if spec.adds_passes and isinstance(overrides.get("passes"), (list, tuple)):
        own = list(overrides["passes"])
        names = {p.get("name") for p in own if isinstance(p, Mapping)}
        kept = [{"name": p.name, "options": dict(p.options)} for p in recipe.passes if p.name not in names]
        overrides = {**overrides, "passes": [*own, *kept]}
    return apply_overrides(recipe, overrides)
