"""Plugin discovery and the per-session component registries.

A ``Session`` owns a pluggy ``PluginManager``. It registers the built-in plugins (modules under
``quantplug.builtins``, registered exactly like third-party ones), then the entry points of the
group ``quantplug``, then calls every ``register_*`` hook once and files what each plugin registers
under its provider name. Environment controls:

* ``QUANTPLUG_LOAD_PLUGINS=a,b``: load only these entry-point plugins (empty: none).
* ``QUANTPLUG_DISABLE_PLUGINS=a,b``: skip these entry-point plugins.
* ``QUANTPLUG_TRACE_PLUGINS=1``: log every hook call (logger ``quantplug.trace``).
* ``QUANTPLUG_STRICT_PLUGINS=1``: a plugin that fails to import is an error (default: a warning, the
  plugin is skipped and listed with its error by ``quantplug plugins``).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pluggy

from quantplug import hookspecs
from quantplug.errors import QuantplugError
from quantplug.interfaces import (
    ActivationPolicy,
    Component,
    DataSource,
    DataTransform,
    Exporter,
    GranularityScheduler,
    ModelAdapter,
    ModelPass,
    Observer,
    ReconstructionLoss,
    Rounding,
)
from quantplug.recipes import RecipeSpec
from quantplug.registry import Registry

logger = logging.getLogger(__name__)
trace_logger = logging.getLogger("quantplug.trace")

ENTRY_POINT_GROUP = "quantplug"

BUILTIN_MODULES: tuple[str, ...] = (
    "quantplug.builtins.observers",
    "quantplug.builtins.roundings",
    "quantplug.builtins.losses",
    "quantplug.builtins.schedulers",
    "quantplug.builtins.policies",
    "quantplug.builtins.recipes",
    "quantplug.builtins.testing_models",
    "quantplug.builtins.exporters",
    "quantplug.builtins.authoring",
    "quantplug.builtins.reporting",
)

# hook name -> (registry attribute, required base class)
REGISTER_HOOKS: dict[str, tuple[str, type | None]] = {
    "register_observers": ("observers", Observer),
    "register_roundings": ("roundings", Rounding),
    "register_losses": ("losses", ReconstructionLoss),
    "register_schedulers": ("schedulers", GranularityScheduler),
    "register_activation_policies": ("activation_policies", ActivationPolicy),
    "register_data_transforms": ("data_transforms", DataTransform),
    "register_recipes": ("recipes", RecipeSpec),
    "register_model_adapters": ("model_adapters", ModelAdapter),
    "register_data_sources": ("data_sources", DataSource),
    "register_exporters": ("exporters", Exporter),
    "register_model_passes": ("model_passes", ModelPass),
}

KIND_TO_ATTR: dict[str, str] = {
    "observer": "observers",
    "rounding": "roundings",
    "loss": "losses",
    "scheduler": "schedulers",
    "activation_policy": "activation_policies",
    "data_transform": "data_transforms",
    "recipe": "recipes",
    "model_adapter": "model_adapters",
    "data_source": "data_sources",
    "exporter": "exporters",
    "model_pass": "model_passes",
}


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


class Session:
    """Plugins and registries for one use of quantplug (a CLI call, a test, a script).

    ``Session()`` loads built-ins plus installed entry points (honouring the environment controls);
    ``Session(entry_points=False, plugins=[...])`` builds an isolated session for tests.
    """

    def __init__(
        self,
        *,
        entry_points: bool = True,
        plugins: Sequence[Any] = (),
        builtins: bool = True,
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.observers: Registry[type[Observer]] = Registry("observer")
        self.roundings: Registry[type[Rounding]] = Registry("rounding")
        self.losses: Registry[type[ReconstructionLoss]] = Registry("loss")
        self.schedulers: Registry[type[GranularityScheduler]] = Registry("scheduler")
        self.activation_policies: Registry[type[ActivationPolicy]] = Registry("activation policy")
        self.data_transforms: Registry[type[DataTransform]] = Registry("data transform")
        self.recipes: Registry[RecipeSpec] = Registry("recipe")
        self.model_adapters: Registry[type[ModelAdapter]] = Registry("model adapter")
        self.data_sources: Registry[type[DataSource]] = Registry("data source")
        self.exporters: Registry[type[Exporter]] = Registry("exporter")
        self.model_passes: Registry[type[ModelPass]] = Registry("model pass")
        self.distributions: dict[str, dict[str, str]] = {}
        self.broken: dict[str, dict[str, str]] = {}
        if os.environ.get("QUANTPLUG_TRACE_PLUGINS"):
            self._enable_trace()
        if builtins:
            for modname in BUILTIN_MODULES:
                self.pm.register(importlib.import_module(modname), name=modname)
        if entry_points:
            self._load_entry_points()
        for i, plugin in enumerate(plugins):
            name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{i}"
            if self.pm.get_plugin(name) is None:
                self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self._collect()
        if self.broken:
            note = (
                f" Plugins that failed to import (see `quantplug plugins`): {', '.join(sorted(self.broken))}."
            )
            for _, registry in self.components():
                registry.note = note

    # ------------------------------------------------------------------ discovery
    def _load_entry_points(self) -> None:
        only = _env_list("QUANTPLUG_LOAD_PLUGINS")
        disabled = set(_env_list("QUANTPLUG_DISABLE_PLUGINS") or [])
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else ep.name
            keys = {ep.name, dist}
            if only is not None and not keys & set(only):
                continue
            if keys & disabled:
                continue
            if self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # one broken plugin must not take the host and the others down
                message = (
                    f"plugin {ep.name!r} (distribution {dist}) failed to import: {exc}. "
                    f"Reinstall it or disable it with QUANTPLUG_DISABLE_PLUGINS={ep.name}"
                )
                if os.environ.get("QUANTPLUG_STRICT_PLUGINS"):
                    raise QuantplugError(message) from exc
                logger.warning("%s; skipping it (QUANTPLUG_STRICT_PLUGINS=1 makes this an error)", message)
                self.broken[ep.name] = {"distribution": dist, "error": f"{type(exc).__name__}: {exc}"}
                continue
            self.pm.register(plugin, name=ep.name)
            version = ep.dist.version if ep.dist is not None else "unknown"
            self.distributions[ep.name] = {"distribution": dist, "version": version}

    def _enable_trace(self) -> None:
        def before(hook_name: str, hook_impls: Sequence[Any], kwargs: dict[str, Any]) -> None:
            trace_logger.info("hook %s -> %s", hook_name, [i.plugin_name for i in hook_impls])

        def after(outcome: Any, hook_name: str, hook_impls: Sequence[Any], kwargs: dict[str, Any]) -> None:
            trace_logger.info("hook %s done", hook_name)

        self.pm.add_hookcall_monitoring(before, after)
        self._trace = True

    def _collect(self) -> None:
        for hook_name, (attr, base) in REGISTER_HOOKS.items():
            registry: Registry[Any] = getattr(self, attr)
            hook = getattr(self.pm.hook, hook_name)
            for impl in reversed(hook.get_hookimpls()):
                provider = self.provider_name(impl.plugin_name)

                def register(obj: Any, *, _registry: Registry[Any] = registry, _provider: str = provider,
                             _base: type | None = base, _hook: str = hook_name) -> None:
                    if _base is not None and not (
                        (isinstance(obj, type) and issubclass(obj, _base)) or isinstance(obj, _base)
                    ):
                        raise QuantplugError(
                            f"plugin {_provider!r} passed {obj!r} to {_hook}; expected a {_base.__name__}"
                        )
                    _registry.register(obj, _provider)

                if getattr(self, "_trace", False):
                    trace_logger.info("hook %s -> %s", hook_name, impl.plugin_name)
                impl.function(register=register)

    def provider_name(self, plugin_name: str) -> str:
        if plugin_name.startswith("quantplug.builtins"):
            return "quantplug"
        return self.distributions.get(plugin_name, {}).get("distribution", plugin_name)

    # ------------------------------------------------------------------ facade
    def registry(self, kind: str) -> Registry[Any]:
        attr = KIND_TO_ATTR.get(kind) or KIND_TO_ATTR.get(kind.rstrip("s"))
        if attr is None:
            aliases = {"policies": "activation_policy", "adapters": "model_adapter", "sources": "data_source",
                       "transforms": "data_transform", "models": "model_adapter", "data": "data_source"}
            attr = KIND_TO_ATTR.get(aliases.get(kind, ""), None)
        if attr is None:
            raise QuantplugError(f"unknown component kind {kind!r}; kinds: {', '.join(KIND_TO_ATTR)}")
        return getattr(self, attr)

    def make(self, kind: str, ref: Any, *args: Any) -> Any:
        """Instantiate the component named by ``ref`` (a ``ComponentRef``) with its options."""
        cls = self.registry(kind).get(ref.name)
        config = cls.make_config(ref.options)
        return cls(*args, config)

    def adapter_for(self, model_id: str) -> ModelAdapter:
        for entry in self.model_adapters:
            adapter = entry.obj()
            if adapter.can_load(model_id):
                return adapter
        prefixes = sorted({p for e in self.model_adapters for p in e.obj.prefixes})
        raise QuantplugError(
            f"no installed model adapter understands {model_id!r}. Known prefixes: "
            f"{', '.join(p + ':' for p in prefixes) or 'none'}. For torchvision models install quantplug-torchvision, "
            "for Hugging Face models quantplug-transformers"
        )

    def default_model_id(self) -> str:
        """The embedded default model: a plugin's default when available, else the built-in tiny model."""
        env = os.environ.get("QUANTPLUG_DEFAULT_MODEL")
        if env:
            return env
        fallback = None
        for entry in self.model_adapters:
            adapter = entry.obj()
            if not adapter.default_model or not adapter.default_available():
                continue
            if entry.provider != "quantplug":
                return adapter.default_model
            fallback = adapter.default_model
        if fallback is None:
            raise QuantplugError("no model given and no adapter offers a default model; pass a model id")
        return fallback

    def data_source_for(self, spec: str) -> DataSource:
        for entry in self.data_sources:
            source = entry.obj()
            if source.can_load(spec):
                return source
        prefixes = sorted({p for e in self.data_sources for p in e.obj.prefixes})
        raise QuantplugError(
            f"no installed data source understands {spec!r}. Known: {', '.join(prefixes) or 'none'}"
        )

    def model_data(self, model_id: str, spec: str, split: str, *, num_samples: int | None = None, seed: int = 0,
                   model_options: Mapping[str, Any] | None = None) -> Any:
        """``split`` of ``spec`` as ``model_id`` needs it: the spec is first completed by the model's adapter
        (:meth:`ModelAdapter.bind_data`, e.g. a pretrained model's preprocessing), then loaded by its source.

        Every place that feeds a model data it did not get from ``apply`` (``quantplug eval``, the ONNX
        exporter's example batch, QAT's ``data`` option, benchmarks) loads it through here.
        """
        bound = self.adapter_for(model_id).bind_data(model_id, spec, model_options)
        if bound != spec:
            logger.info("data %s for %s: %s", spec, model_id, bound)
        return self.data_source_for(bound).load(bound, split, num_samples=num_samples, seed=seed)

    def components(self) -> Iterable[tuple[str, Registry[Any]]]:
        for kind, attr in KIND_TO_ATTR.items():
            yield kind, getattr(self, attr)

    def plugin_report(self) -> list[dict[str, Any]]:
        """What each plugin distribution provides (for ``quantplug plugins``)."""
        providers: dict[str, dict[str, Any]] = {}
        from quantplug import __version__

        for kind, registry in self.components():
            for entry in registry:
                info = providers.setdefault(entry.provider, {"name": entry.provider, "registers": {}})
                info["registers"].setdefault(kind, []).append(entry.name)
        for plugin_name, meta in self.distributions.items():
            info = providers.setdefault(meta["distribution"], {"name": meta["distribution"], "registers": {}})
            info["version"] = meta["version"]
            info.setdefault("entry_points", []).append(plugin_name)
        if "quantplug" in providers:
            providers["quantplug"]["version"] = __version__
            providers["quantplug"]["builtin"] = True
        for info in providers.values():
            hooks = set()
            for plugin in self.pm.get_plugins():
                pname = self.pm.get_name(plugin) or ""
                if self.provider_name(pname) == info["name"]:
                    hooks.update(h.name for h in self.pm.get_hookcallers(plugin) or [])
            info["hooks"] = sorted(hooks)
        for plugin_name, meta in self.broken.items():
            info = providers.setdefault(meta["distribution"], {"name": meta["distribution"], "registers": {}})
            info.setdefault("entry_points", []).append(plugin_name)
            info["error"] = meta["error"]
            info.setdefault("hooks", [])
        return sorted(providers.values(), key=lambda i: (not i.get("builtin", False), i["name"]))


def component_class(session: Session, kind: str, name: str) -> type[Component]:
    return session.registry(kind).get(name)
