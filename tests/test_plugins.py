"""Plugin system: discovery through entry points, environment controls, registry errors, tracing."""

from __future__ import annotations

import importlib.metadata as md
import logging
import sys
import types
from typing import Any

import pytest

from quantplug import hookimpl
from quantplug.errors import DuplicateComponentError, QuantplugError, UnknownComponentError
from quantplug.interfaces import Rounding
from quantplug.plugins import Session
from quantplug.registry import Registry


class Dup(Rounding):
    """duplicate of nearest"""

    name = "nearest"


def test_builtins_are_registered_as_plugins() -> None:
    s = Session(entry_points=False)
    assert {"minmax", "mse", "percentile", "kl", "aciq", "ema"} <= set(s.observers.names())
    assert {"nearest", "stochastic"} <= set(s.roundings.names())
    assert {"layer", "block", "stage", "network", "groups"} <= set(s.schedulers.names())
    assert {"quantized", "fp"} <= set(s.activation_policies.names())
    assert "mse" in s.losses and "nearest" in s.recipes
    assert s.roundings.entry("nearest").provider == "quantplug"
    report = s.plugin_report()
    assert report[0]["name"] == "quantplug" and report[0]["builtin"]
    assert "register_roundings" in report[0]["hooks"]


def test_unknown_name_lists_suggests_and_hints_install() -> None:
    s = Session(entry_points=False)
    with pytest.raises(UnknownComponentError) as err:
        s.roundings.get("neerest")
    msg = str(err.value)
    assert "Did you mean 'nearest'" in msg and "stochastic" in msg and "pip install quantplug-neerest" in msg


def test_duplicate_from_two_plugins_names_both() -> None:
    class P:
        @hookimpl
        def register_roundings(self, register):  # type: ignore[no-untyped-def]
            register(Dup)

    with pytest.raises(DuplicateComponentError) as err:
        Session(entry_points=False, plugins=[P()])
    assert "'quantplug'" in str(err.value) and "'P-0'" in str(err.value)


def test_reregistering_same_object_is_noop() -> None:
    reg: Registry[type] = Registry("rounding")
    reg.register(Dup, "a")
    reg.register(Dup, "b")
    assert len(reg) == 1 and reg.entry("nearest").provider == "a"


def test_wrong_type_passed_to_register_is_an_error() -> None:
    class P:
        @hookimpl
        def register_roundings(self, register):  # type: ignore[no-untyped-def]
            register(object)

    with pytest.raises(QuantplugError, match="expected a Rounding"):
        Session(entry_points=False, plugins=[P()])


class _FakeDist:
    def __init__(self, name: str) -> None:
        self.name = name
        self.version = "9.9"


def _install_fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fake distributions exposing entry points in the group ``quantplug``."""
    for mod_name, rounding_name in (("fake_alpha", "alpha"), ("fake_beta", "beta")):
        module = types.ModuleType(mod_name)
        cls = type(f"R{rounding_name}", (Rounding,), {"name": rounding_name, "__doc__": "fake"})

        def register_roundings(register, _cls=cls):  # type: ignore[no-untyped-def]
            register(_cls)

        module.register_roundings = hookimpl(register_roundings)  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, mod_name, module)
    eps = []
    for mod_name in ("fake_alpha", "fake_beta"):
        ep = md.EntryPoint(name=mod_name.split("_")[1], value=mod_name, group="quantplug")
        ep = ep._for(_FakeDist(f"quantplug-{mod_name.split('_')[1]}"))  # type: ignore[attr-defined]
        eps.append(ep)

    def fake_entry_points(**kwargs):  # type: ignore[no-untyped-def]
        return eps if kwargs.get("group") == "quantplug" else []

    monkeypatch.setattr("quantplug.plugins.md.entry_points", fake_entry_points)


def test_entry_points_are_discovered_with_provider_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_entry_points(monkeypatch)
    s = Session()
    assert s.roundings.entry("alpha").provider == "quantplug-alpha"
    report = {p["name"]: p for p in s.plugin_report()}
    assert report["quantplug-beta"]["version"] == "9.9"
    assert report["quantplug-beta"]["registers"] == {"rounding": ["beta"]}


def test_load_and_disable_controls(monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_entry_points(monkeypatch)
    monkeypatch.setenv("QUANTPLUG_LOAD_PLUGINS", "alpha")
    s = Session()
    assert "alpha" in s.roundings and "beta" not in s.roundings
    monkeypatch.setenv("QUANTPLUG_LOAD_PLUGINS", "")
    s = Session()
    assert "alpha" not in s.roundings and "nearest" in s.roundings
    monkeypatch.delenv("QUANTPLUG_LOAD_PLUGINS")
    monkeypatch.setenv("QUANTPLUG_DISABLE_PLUGINS", "quantplug-beta")
    s = Session()
    assert "alpha" in s.roundings and "beta" not in s.roundings


def test_trace_logs_hook_calls(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("QUANTPLUG_TRACE_PLUGINS", "1")
    with caplog.at_level(logging.INFO, logger="quantplug.trace"):
        s = Session(entry_points=False)
        s.pm.hook.on_run_end(run=None, result=None)
    text = caplog.text
    assert "register_roundings" in text and "on_run_end" in text


def test_broken_plugin_import_is_a_clear_error_in_strict_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = md.EntryPoint(name="broken", value="does_not_exist_quantplug_mod", group="quantplug")
    monkeypatch.setattr("quantplug.plugins.md.entry_points", lambda **kw: [ep])
    monkeypatch.setenv("QUANTPLUG_STRICT_PLUGINS", "1")
    with pytest.raises(QuantplugError, match="QUANTPLUG_DISABLE_PLUGINS=broken"):
        Session()


def test_broken_plugin_is_skipped_with_a_warning_and_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ep = md.EntryPoint(name="broken", value="does_not_exist_quantplug_mod", group="quantplug")
    monkeypatch.setattr("quantplug.plugins.md.entry_points", lambda **kw: [ep])
    monkeypatch.delenv("QUANTPLUG_STRICT_PLUGINS", raising=False)
    with caplog.at_level(logging.WARNING, logger="quantplug.plugins"):
        s = Session()
    assert "broken" in caplog.text and "QUANTPLUG_DISABLE_PLUGINS=broken" in caplog.text
    assert "nearest" in s.roundings  # the built-ins still work
    report = {p["name"]: p for p in s.plugin_report()}
    assert "ModuleNotFoundError" in report["broken"]["error"]
    with pytest.raises(QuantplugError, match="failed to import.*broken"):
        s.roundings.get("brokenround")


def test_unknown_option_of_component_is_an_error() -> None:
    from quantplug.config import ComponentRef
    from quantplug.errors import ConfigError

    s = Session(entry_points=False)
    with pytest.raises(ConfigError, match="has no option"):
        s.make("loss", ComponentRef("mse", {"q": 3}))


def test_event_hooks_and_plugin_commands(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from quantplug.api import apply
    from quantplug.cli import main

    events: list[str] = []

    class Events:
        @hookimpl
        def on_run_start(self, run):  # type: ignore[no-untyped-def]
            events.append(f"start:{len(run.plan)}")

        @hookimpl
        def on_unit_end(self, run, unit, record):  # type: ignore[no-untyped-def]
            events.append(f"unit:{unit.name}:{record.iters}")

        @hookimpl
        def on_run_end(self, run, result):  # type: ignore[no-untyped-def]
            events.append(f"end:{result.quant_metrics['top1'] > 0}")

        @hookimpl
        def register_commands(self, subparsers):  # type: ignore[no-untyped-def]
            p = subparsers.add_parser("hello", help="say hello")
            p.set_defaults(func=lambda args: print("hello from a plugin") or 0)

    s = Session(entry_points=False, plugins=[Events()])
    apply("nearest", session=s, overrides={"calib.num_samples": 32}, eval_samples=20)
    assert events == ["start:5", "unit:stem:0", "unit:layer1.0:0", "unit:layer1.1:0", "unit:layer2.0:0",
                      "unit:head:0", "end:True"]
    monkeypatch.setattr("quantplug.cli._session", lambda: Session(entry_points=False, plugins=[Events()]))
    assert main(["hello"]) == 0
    assert "hello from a plugin" in capsys.readouterr().out


def test_data_transform_and_loss_extras_reach_the_engine() -> None:
    """A transform rewrites cached unit inputs; a loss's per-sample extras arrive sliced per batch."""
    import torch

    from quantplug.api import apply
    from quantplug.interfaces import DataTransform, LossContext, ReconstructionLoss

    seen: dict[str, object] = {}

    class Zero(DataTransform):
        """Zero the inputs (test only)."""

        name = "zero"

        def apply(self, run, unit, inputs):  # type: ignore[no-untyped-def]
            seen["transform_shape"] = tuple(inputs.shape)
            return torch.zeros_like(inputs)

    class Weighted(ReconstructionLoss):
        """Weighted MSE with a per-sample weight captured up front (test only)."""

        name = "weighted"
        extra_keys = ("weight",)

        def capture_extras(self, run, unit):  # type: ignore[no-untyped-def]
            n = sum(x.shape[0] for x in run.calib_inputs)
            return {"weight": torch.arange(n, dtype=torch.float32)}

        def __call__(self, output, target, context: LossContext):  # type: ignore[no-untyped-def]
            w = context.extras["weight"]
            seen.setdefault("batches", []).append(w.shape[0])  # type: ignore[union-attr]
            return ((output - target) ** 2).flatten(1).sum(1).mul(w).mean()

    class P:
        @hookimpl
        def register_data_transforms(self, register):  # type: ignore[no-untyped-def]
            register(Zero)

        @hookimpl
        def register_losses(self, register):  # type: ignore[no-untyped-def]
            register(Weighted)

    s = Session(entry_points=False, plugins=[P()])
    result = apply("nearest-lsq", session=s, eval_samples=20,
                   overrides={"calib.num_samples": 48, "calib.batch_size": 16, "recon.iters": 3,
                              "recon.batch_size": 8, "loss.name": "weighted", "data_transforms": [{"name": "zero"}],
                              "scheduler.name": "network"})
    assert seen["transform_shape"] == (16, 3, 16, 16)
    # 3 training batches of 8, then before/after evaluations over 48 samples in slices of 8
    assert seen["batches"] == [8] * (6 + 3 + 6)
    assert len(result.records) == 1


def test_fp_input_transform_recomputes_targets() -> None:
    """A transform on the full-precision inputs changes the targets the unit is reconstructed toward."""
    import torch

    from quantplug.api import apply
    from quantplug.interfaces import DataTransform, LossContext, ReconstructionLoss

    seen: dict[str, float] = {}

    class ZeroFp(DataTransform):
        """Zero the fp inputs (test only)."""

        name = "zero-fp"
        applies_to = "fp_inputs"

        def apply(self, run, unit, inputs):  # type: ignore[no-untyped-def]
            return torch.zeros_like(inputs)

    class Spy(ReconstructionLoss):
        """MSE that records the largest target seen (test only)."""

        name = "spy"

        def __call__(self, output, target, context: LossContext):  # type: ignore[no-untyped-def]
            seen[str(len(seen))] = float(target.std(0).max())  # spread over samples
            return (output - target).square().mean()

    class P:
        @hookimpl
        def register_data_transforms(self, register):  # type: ignore[no-untyped-def]
            register(ZeroFp)

        @hookimpl
        def register_losses(self, register):  # type: ignore[no-untyped-def]
            register(Spy)

    s = Session(entry_points=False, plugins=[P()])
    apply("nearest", session=s, eval_samples=20,
          overrides={"calib.num_samples": 16, "loss.name": "spy", "data_transforms": [{"name": "zero-fp"}],
                     "scheduler.name": "block",
                     "activation": None})
    # every unit's fp input was zeroed, so its recomputed targets are the same for every sample
    assert seen and max(seen.values()) == 0.0


def test_model_data_completes_the_spec_with_the_model_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """``quantplug eval``, the ONNX example batch, QAT's data and the benchmarks load data through
    ``Session.model_data``: the model's adapter completes the spec (with the model's options) before loading."""
    session = Session()
    adapter_type = type(session.adapter_for("testing:tiny-resnet"))
    calls: list[tuple[str, str, Any]] = []

    def bind(self: Any, model_id: str, data: str, options: Any = None) -> str:
        calls.append((model_id, data, options))
        return "synthetic:images" if data == "my-images" else data

    monkeypatch.setattr(adapter_type, "bind_data", bind)
    dataset = session.model_data("testing:tiny-resnet", "my-images", "test", num_samples=5,
                                 model_options={"width": 2})
    assert len(dataset) == 5 and dataset[0][0].shape == (3, 16, 16)
    assert calls == [("testing:tiny-resnet", "my-images", {"width": 2})]
    with pytest.raises(QuantplugError, match="no installed data source understands 'other'"):
        session.model_data("testing:tiny-resnet", "other", "test")
