"""The quantplug command line: every command, and every bad-input path as one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from quantplug.cli import main

ENV = {**os.environ, "QUANTPLUG_PROGRESS": "0", "QUANTPLUG_LOAD_PLUGINS": ""}


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTPLUG_LOAD_PLUGINS", "")  # never load whatever happens to be installed


def test_plugins_lists_builtins_as_json(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    report = json.loads(out)
    host = report[0]
    assert host["name"] == "quantplug" and host["builtin"] and host["version"]
    assert "nearest" in host["registers"]["rounding"] and "mse" in host["registers"]["observer"]


def test_list_and_show(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "list", "scheduler")
    assert code == 0 and "network" in out and "quantplug" in out
    code, out, _ = run_cli(capsys, "list", "--json")
    data = json.loads(out)
    assert {"observer", "rounding", "loss", "scheduler", "recipe"} <= set(data)
    code, out, _ = run_cli(capsys, "show", "recipe", "nearest-lsq", "--preset", "cpu-fast")
    info = json.loads(out)
    assert info["resolved"]["recon"]["iters"] == 300 and info["extends"] == "nearest"
    code, out, _ = run_cli(capsys, "show", "observer", "mse")
    assert json.loads(out)["options"]["p"] == 2.4


def test_apply_eval_round_trip(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "apply", "--plugin", "nearest", "testing:tiny-resnet", "--w-bits", "4",
                             "--a-bits", "4", "--calib-samples", "128", "--eval-samples", "200", "--out", str(out_dir))
    assert code == 0, err
    assert "full precision" in out and "quantized" in out and str(out_dir) in out
    code, out, _ = run_cli(capsys, "eval", str(out_dir), "--json")
    metrics = json.loads(out)["metrics"]
    manifest = json.loads((out_dir / "quantplug.json").read_text())
    assert metrics["top1"] == pytest.approx(manifest["metrics"]["quant"]["top1"])


def test_dry_run_prints_plan_and_memory(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run_cli(capsys, "apply", "--plugin", "nearest-lsq", "--dry-run", "-o", "scheduler.name=layer")
    assert code == 0 and "units (9)" in out and "reconstruction cache: up to" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["apply", "--plugin", "qdorp"], "pip install quantplug-qdorp"),
        (["apply", "--w-bits", "9"], "2 to 8"),
        (["apply", "-o", "recon.iterz=3"], "unknown override path"),
        (["apply", "-o", "rounding.name=adarund"], "unknown rounding 'adarund'"),
        (["apply", "nosuch:model"], "no installed model adapter"),
        (["apply", "testing:tiny-nope"], "unknown testing model"),
        (["apply", "--data", "synthetic:nope", "--calib-samples", "8"], "unknown synthetic data"),
        (["apply", "--device", "cuda:7"] if not __import__("torch").cuda.is_available() else
         ["apply", "--device", "nonsense"], "device"),
        (["eval", "/nonexistent/run"], "not a directory"),
        (["show", "rounding", "nope"], "unknown rounding"),
        (["list", "gadgets"], "unknown component kind"),
        (["apply", "-o", "rounding.options.foo=1"], "has no option"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, args, needle) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(capsys, *args)
    assert code != 0
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "quantplug.cli", "--debug", "apply", "--plugin", "qdorp"],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_incompatible_components_error(capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli(capsys, "apply", "-o", "activation=null", "-o", "recon.learn_act_step=true", "-o",
                           "recon.iters=5", "--calib-samples", "16")
    assert code != 0 and "needs quantized activations" in err
    # the same request through --a-bits 0, which itself sets recon.learn_act_step: the flag and -o collide
    code, _, err = run_cli(capsys, "apply", "--a-bits", "0", "-o", "recon.learn_act_step=true")
    assert code == 2 and "--a-bits 0 and -o recon.learn_act_step=true" in err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path) -> None:
    """SIGKILL a real CLI run after its first checkpoint; --resume finishes with identical weights."""
    args = [sys.executable, "-m", "quantplug.cli", "apply", "--plugin", "nearest-lsq", "testing:tiny-resnet",
            "--w-bits", "3", "--a-bits", "4", "--calib-samples", "128", "--iters", "150", "--eval-samples", "100"]
    ref = tmp_path / "ref"
    subprocess.run([*args, "--out", str(ref)], check=True, env=ENV, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed.checkpoint" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not out.exists()
    subprocess.run([*args, "--out", str(out), "--resume"], check=True, env=ENV, capture_output=True)
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_reader_that_stops_early_is_not_an_error() -> None:
    """``quantplug plugins | grep -q X`` closes the pipe once it matches; the CLI used to report
    ``BrokenPipeError`` and exit 1, which failed a ``set -o pipefail`` script."""
    proc = subprocess.Popen([sys.executable, "-m", "quantplug.cli", "plugins"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "QUANTPLUG_PROGRESS": "0"})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child writes: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Error" not in err and "Traceback" not in err
