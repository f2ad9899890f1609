"""Bad numbers, types and flag combinations on the way in: one clear error naming the option."""

from __future__ import annotations

import pytest

from quantplug.builtins.testing_models import SyntheticData
from quantplug.cli import main
from quantplug.config import CalibConfig, Recipe, apply_overrides
from quantplug.errors import ConfigError, DataError

TINY = ["apply", "testing:tiny-resnet", "--data", "synthetic:images", "--calib-samples", "16", "--eval-samples", "16",
        "-o", "recon.iters=2", "--no-save"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTPLUG_LOAD_PLUGINS", "")
    monkeypatch.setenv("QUANTPLUG_PROGRESS", "0")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- 1. calibration settings
@pytest.mark.parametrize("field,value", [("num_samples", 0), ("num_samples", -5), ("batch_size", 0)])
def test_calib_config_rejects_non_positive_counts(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"calib.{field} .*at least 1"):
        CalibConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"calib.{field}"):
        apply_overrides(Recipe(), {f"calib.{field}": value})


def test_calib_batch_size_zero_on_the_command_line_is_one_clear_line(capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli(capsys, *TINY, "-o", "calib.batch_size=0")
    assert code == 2 and "calib.batch_size must be at least 1" in err and err.count("\n") == 1


def test_synthetic_source_refuses_non_positive_counts_instead_of_using_the_default() -> None:
    assert len(SyntheticData().load("synthetic:images", "train", num_samples=5, seed=0)) == 5
    assert len(SyntheticData().load("synthetic:images", "test", num_samples=None, seed=0)) == 1000
    for n in (0, -5):  # before: 0 quietly gave 2048 samples, -5 a "negative dimension" RuntimeError
        with pytest.raises(DataError, match="at least 1"):
            SyntheticData().load("synthetic:images", "train", num_samples=n, seed=0)


# --------------------------------------------------------------------------- 3. override types
@pytest.mark.parametrize(
    "path,value,needle",
    [
        ("recon.iters", "abc", "recon.iters must be an integer, got 'abc'"),
        ("recon.iters", 2.5, "recon.iters must be an integer, got 2.5"),
        ("recon.iters", True, "recon.iters must be an integer, got True"),
        ("recon.lr", "fast", "recon.lr must be a number, got 'fast'"),
        ("recon.learn_act_step", 1, "recon.learn_act_step must be true or false, got 1"),
        ("recon.cache", 3, "recon.cache must be a string, got 3"),
        ("weight.bits", "4", "weight.bits must be an integer, got '4'"),
        ("bits.first_layer_bits", "eight", "bits.first_layer_bits must be an integer, got 'eight'"),
        ("bits.overrides", [["layer1.*", 3]], "bits.overrides[0] must be a list of 3 values"),
        ("bits.overrides", [["layer1.*", "x", 4]], "bits.overrides[0][1] must be an integer, got 'x'"),
        ("bits.overrides", "layer1", "bits.overrides must be a list, got 'layer1'"),
        ("rounding.options", [1], "rounding.options must be a mapping"),
        ("weight.granularity", 5, "weight.granularity must be a granularity"),
    ],
)
def test_override_values_are_checked_against_the_field_types(path: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(Recipe(), {path: value})
    assert needle in str(info.value)


def test_nested_granularity_fields_are_type_checked_too() -> None:
    with pytest.raises(ConfigError, match="weight.granularity.group_size must be an integer, got 'abc'"):
        apply_overrides(Recipe(), {"weight.granularity": "per_group", "weight.granularity.group_size": "abc"})


def test_well_typed_values_still_load_and_an_int_is_a_valid_float() -> None:
    r = apply_overrides(Recipe(), {"recon.lr": 1, "recon.iters": 7, "bits.first_layer_bits": None,
                                   "bits.overrides": [["layer1.*", 3, 0]], "rounding.options": {"x": "y"},
                                   "weight.granularity": {"kind": "per_group", "group_size": 8}})
    assert r.recon.lr == 1.0 and isinstance(r.recon.lr, float) and r.recon.iters == 7
    assert r.bits.first_layer_bits is None and r.bits.overrides == (("layer1.*", 3, 0),)
    assert Recipe.from_dict(r.to_dict()) == r


def test_a_manifest_recipe_with_a_wrong_type_names_the_field() -> None:
    data = Recipe().to_dict()
    data["calib"]["seed"] = "zero"
    with pytest.raises(ConfigError, match="calib.seed must be an integer, got 'zero'"):
        Recipe.from_dict(data)


def test_wrong_override_type_on_the_command_line_is_one_clear_line(capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli(capsys, "apply", "testing:tiny-resnet", "-o", "recon.iters=abc", "--dry-run")
    assert code == 2 and "recon.iters must be an integer, got 'abc'" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- 2. empty test split, sample counts
def test_evaluate_on_an_empty_test_split_is_a_data_error() -> None:
    import torch

    from quantplug.builtins.testing_models import TinyModelAdapter
    from quantplug.evaluate import evaluate

    adapter = TinyModelAdapter()
    model = adapter.load("testing:tiny-resnet", device=torch.device("cpu"))
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="the test split is empty"):
        evaluate(model, adapter, torch.utils.data.DataLoader(empty, batch_size=8), torch.device("cpu"))
    some = torch.utils.data.TensorDataset(torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
    assert "top1" in evaluate(model, adapter, torch.utils.data.DataLoader(some, batch_size=8), torch.device("cpu"))


COUNT_FLAGS = [(["apply", "testing:tiny-resnet"], flag, value)
               for flag in ("--eval-samples", "--calib-samples") for value in ("0", "-5", "ten")]
COUNT_FLAGS += [(["eval", "some-run"], "--eval-samples", value) for value in ("0", "-5", "ten")]


@pytest.mark.parametrize("command,flag,value", COUNT_FLAGS)
def test_sample_counts_below_one_are_refused_by_the_parser(capsys, command, flag, value) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as info:
        main([*command, flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and flag in err
    assert ("at least 1" in err) if value != "ten" else ("whole number" in err)


def test_positive_int_accepts_counts_from_one() -> None:
    from quantplug.cli import positive_int

    assert positive_int("1") == 1 and positive_int("2048") == 2048


# --------------------------------------------------------------------------- 9. bit widths by role
def test_one_bit_activations_say_activations_need_two_bits_not_the_lowbit_plugin(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        apply_overrides(Recipe(), {"activation.bits": 1})
    text = str(info.value)
    assert "activations need at least 2 bits" in text and "lowbit" not in text and "--a-bits 0" in text
    code, _, err = run_cli(capsys, "apply", "testing:tiny-resnet", "--a-bits", "1", "--dry-run")
    assert code == 2 and "activations need at least 2 bits" in err and "lowbit" not in err


def test_one_bit_weights_still_point_to_the_lowbit_plugin() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(Recipe(), {"weight.bits": 1})
    assert "weight bit width 1" in str(info.value) and "quantplug-lowbit" in str(info.value)
    with pytest.raises(ConfigError, match="2 to 8"):  # built directly: no role known, both hints
        from quantplug.config import QuantSpec

        QuantSpec(bits=1)


# --------------------------------------------------------------------------- 4. a flag and -o on the same path
@pytest.mark.parametrize(
    "flags,override,needle",
    [
        (["--w-bits", "5"], "weight.bits=3", "--w-bits 5 and -o weight.bits=3 both set weight.bits"),
        (["--a-bits", "0"], "activation.bits=4", "--a-bits 0 and -o activation.bits=4 both set activation"),
        (["--a-bits", "4"], "activation=null", "--a-bits 4 and -o activation=null both set activation"),
        (["--iters", "3"], "recon.iters=5", "--iters 3 and -o recon.iters=5 both set recon.iters"),
        (["--seed", "1"], "calib={}", "--seed 1 and -o calib={} both set calib"),
    ],
)
def test_a_flag_and_an_override_of_the_same_path_are_refused(capsys, flags, override, needle) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli(capsys, "apply", "testing:tiny-resnet", *flags, "-o", override, "--dry-run")
    assert code == 2 and needle in err and err.count("\n") == 1


def test_a_flag_and_an_override_of_different_paths_combine(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(capsys, "apply", "testing:tiny-resnet", "--w-bits", "5", "-o", "activation.bits=3",
                             "-o", "weight.symmetric=true", "--dry-run", "--json")
    assert code == 0, err
    weight = __import__("json").loads(out)["recipe"]["weight"]
    assert weight["bits"] == 5 and weight["symmetric"]


# --------------------------------------------------------------------------- 5. eval checks the device first
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    from quantplug.api import apply

    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    apply("nearest", "testing:tiny-resnet", data="synthetic:images", overrides={"calib.num_samples": 16},
          eval_samples=16, out_dir=out, evaluate_fp=False)
    return out


def test_eval_on_cuda_without_cuda_is_one_clear_line(capsys, monkeypatch, saved_run) -> None:  # type: ignore[no-untyped-def]
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli(capsys, "eval", saved_run, "--device", "cuda")
    assert code == 2 and "CUDA is not available; use --device cpu" in err and err.count("\n") == 1
    assert out == ""
    code, out, err = run_cli(capsys, "eval", saved_run, "--device", "cpu", "--json")
    assert code == 0, err


# --------------------------------------------------------------------------- 6. / 7. global options, progress bars
@pytest.fixture
def reset_quiet():  # type: ignore[no-untyped-def]
    from quantplug.progress import set_quiet

    yield
    set_quiet(False)


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_work_before_and_after_the_command(where: str) -> None:
    from quantplug.cli import build_parser

    parser = build_parser()
    for flag, attr in (("--debug", "debug"), ("--quiet", "quiet"), ("-q", "quiet"), ("-v", "verbose")):
        argv = [flag, "eval", "RUN"] if where == "before" else ["eval", "RUN", flag]
        args = parser.parse_args(argv)
        assert getattr(args, attr) is True and args.run_dir == "RUN"
        others = {"debug", "quiet", "verbose"} - {attr}
        assert not any(getattr(args, o) for o in others)
    args = parser.parse_args(["new-plugin", "x", "--kind", "loss", "--debug"])  # a plugin-registered command too
    assert args.debug


def test_debug_after_the_command_shows_the_traceback(capsys) -> None:  # type: ignore[no-untyped-def]
    from quantplug.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError):
        main(["apply", "--plugin", "qdorp", "--debug"])
    code, _, err = run_cli(capsys, "apply", "--plugin", "qdorp")
    assert code == 2 and "Traceback" not in err


def test_progress_bars_only_on_a_terminal_unless_forced(monkeypatch, reset_quiet) -> None:  # type: ignore[no-untyped-def]
    import io

    from quantplug.progress import progress_bar, progress_enabled, set_quiet

    def drawn() -> str:
        buffer = io.StringIO()  # not a TTY, like a log file
        for _ in progress_bar(range(3), file=buffer, mininterval=0, desc="work"):
            pass
        return buffer.getvalue()

    monkeypatch.delenv("QUANTPLUG_PROGRESS")
    assert progress_enabled() is None and drawn() == ""
    monkeypatch.setenv("QUANTPLUG_PROGRESS", "1")
    assert progress_enabled() is True and "work" in drawn()
    monkeypatch.setenv("QUANTPLUG_PROGRESS", "0")
    assert progress_enabled() is False and drawn() == ""
    monkeypatch.setenv("QUANTPLUG_PROGRESS", "1")
    set_quiet(True)
    assert progress_enabled() is False and drawn() == ""


@pytest.mark.parametrize("argv,level", [(["-v", "list", "loss"], "INFO"),
                                        (["-v", "list", "loss", "--quiet"], "WARNING"),
                                        (["--quiet", "-v", "list", "loss"], "WARNING"),
                                        (["list", "loss", "--debug"], "DEBUG")])
def test_quiet_lowers_logging_to_warnings(monkeypatch, capsys, reset_quiet, argv, level) -> None:  # type: ignore[no-untyped-def]
    import logging

    from quantplug import progress

    levels: list[int] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    assert main(argv) == 0
    assert levels == [getattr(logging, level)]
    assert progress._quiet is ("--quiet" in argv)


def test_quiet_run_draws_no_bars_and_no_plan_line(capsys, monkeypatch, reset_quiet) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("QUANTPLUG_PROGRESS", "1")
    code, _, err = run_cli(capsys, *TINY)
    assert code == 0 and "evaluate fp and quantized" in err  # forced on: bars even into a captured stderr
    assert "reconstruction units" in err  # the plan line
    code, _, err = run_cli(capsys, *TINY, "--quiet")
    assert code == 0 and "evaluate" not in err and "reconstruction units" not in err and err == ""


def test_the_recipe_records_the_calibration_samples_actually_used(session) -> None:  # type: ignore[no-untyped-def]
    import torch

    from quantplug.api import apply
    from quantplug.interfaces import DataSource

    class Forty(DataSource):
        """40 calibration images, whatever is asked."""

        name = "forty"
        prefixes = ("forty",)

        def load(self, spec, split, *, num_samples, seed):  # type: ignore[no-untyped-def]
            n = 40 if split == "train" else 8
            return torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16), torch.zeros(n, dtype=torch.long))

    session.data_sources.register(Forty, "test")
    result = apply("nearest", "testing:tiny-resnet", data="forty:x", session=session,
                   overrides={"calib.num_samples": 1000})
    assert result.recipe.calib.num_samples == 40  # 1000 asked for, 40 given: the manifest says 40
