"""Data-parallel reconstruction: two CPU processes on the gloo backend (quantplug.distributed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantplug import distributed
from quantplug.api import apply
from quantplug.errors import ConfigError
from quantplug.testing.distributed import RankResult, assert_ranks_agree, run_data_parallel

#: QDrop at W2A4: learned rounding, learned activation steps and random dropping, on the tiny ResNet
RUN = {"plugin": "qdrop", "model_id": "testing:tiny-resnet", "evaluate_fp": False,
       "overrides": {"weight.bits": 2, "activation.bits": 4, "recon.iters": 40, "calib.num_samples": 64,
                     "recon.batch_size": 16}}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list:
    return run_data_parallel(tmp_path_factory.mktemp("dp"), world_size=2, **RUN)


def test_ranks_take_the_same_steps(two_ranks: list) -> None:
    # each rank reconstructs from its own half of the samples: without averaged gradients the models would drift
    assert_ranks_agree(two_ranks)
    records = two_ranks[0].records
    assert len(records) > 2 and all(r["iters"] == 40 for r in records)
    learned = [r for r in records if r["name"] != "head" and r["loss_before"] > 1e-3]  # the 8-bit stem loses ~0
    assert len(learned) >= 3 and all(r["loss_after"] < r["loss_before"] for r in learned)


def test_only_rank_zero_evaluates(two_ranks: list) -> None:
    assert set(two_ranks[0].quant_metrics) >= {"top1"} and two_ranks[1].quant_metrics == {}


def test_without_steps_two_ranks_are_one_process(tmp_path: Path) -> None:
    # no optimizer steps: observers ran on every sample and unit losses are means over both shards, so every
    # number equals a single process's over all samples
    run = {**RUN, "overrides": {**RUN["overrides"], "recon.iters": 0}}
    ranks = run_data_parallel(tmp_path, world_size=2, **run)
    single = apply(**run)
    assert_ranks_agree(ranks)
    assert [r["loss_before"] for r in ranks[0].records] == pytest.approx(
        [r.loss_before for r in single.records], rel=1e-5)
    assert [r["loss_after"] for r in ranks[0].records] == pytest.approx(
        [r.loss_after for r in single.records], rel=1e-5)
    assert single.model is not None
    assert all(torch.equal(v, ranks[0].state[k]) for k, v in single.model.state_dict().items())
    assert ranks[0].quant_metrics == single.quant_metrics


def test_data_parallel_lands_where_one_process_does(two_ranks: list) -> None:
    single = apply(**RUN)
    assert two_ranks[0].quant_metrics["top1"] == pytest.approx(single.quant_metrics["top1"], abs=3.0)
    for dp, one in zip(two_ranks[0].records, single.records):
        assert dp["loss_after"] == pytest.approx(one.loss_after, rel=0.05, abs=1e-3)


def test_a_changed_rank_is_detected() -> None:
    ranks = [distributed_result(0, 1.0), distributed_result(1, 1.5)]
    with pytest.raises(AssertionError, match="rank 1 ended with other values"):
        assert_ranks_agree(ranks)


def distributed_result(rank: int, value: float) -> RankResult:
    return RankResult(rank, {"w": torch.full((2,), value)}, [], {})


def test_shards_and_batches_follow_the_world(monkeypatch: pytest.MonkeyPatch) -> None:
    assert distributed.world() == (0, 1) and list(distributed.shard_indices(5)) == [0, 1, 2, 3, 4]
    monkeypatch.setattr(distributed, "world", lambda: (1, 3))
    assert list(distributed.shard_indices(8)) == [1, 4, 7]
    assert distributed.batch_per_rank(32) == 11  # ceil: the step's global batch is at least the recipe's
    with pytest.raises(ConfigError, match="cannot be shared by 3 processes"):
        distributed.shard_indices(2)


def test_a_launcher_without_its_variables_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node"):
        distributed.init_from_environment(torch.device("cpu"))


def _quantplug(args: list[str], cwd: Path, processes: int = 1) -> subprocess.CompletedProcess[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    launcher = launcher if processes > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUANTPLUG_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, *launcher, "-m", "quantplug", *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _quantplug(["apply", "testing:tiny-resnet", "--plugin", "adaround", "--w-bits", "3", "--iters", "20",
                       "--calib-samples", "32", "--eval-samples", "64", "--out", str(out)], tmp_path, processes=2)
    assert proc.stdout.count("adaround on testing:tiny-resnet") == 1  # rank 0 reports, rank 1 stays quiet
    assert "per process (2 processes, each caching its shard)" in proc.stderr
    assert (out / "quantplug.json").is_file() and not Path(f"{out}.checkpoint").exists()


def test_each_process_caches_half(tmp_path: Path) -> None:
    args = ["apply", "testing:tiny-resnet", "--plugin", "qdrop", "--calib-samples", "256", "--dry-run", "--json"]
    one = json.loads(_quantplug(args, tmp_path).stdout)["memory"]
    two = json.loads(_quantplug(args, tmp_path, processes=2).stdout)["memory"]
    assert _bytes(two) == pytest.approx(_bytes(one) / 2, rel=0.01), (one, two)


def _bytes(memory: str) -> float:
    found = re.search(r"up to ([0-9.]+) (KiB|MiB|GiB)", memory)
    assert found, memory
    return float(found[1]) * 1024 ** ("KiB", "MiB", "GiB").index(found[2])


@pytest.mark.slow
@pytest.mark.parametrize("plugin, base, model_id", [
    ("adaround", None, "testing:tiny-resnet"), ("brecq", None, "testing:tiny-resnet"),
    ("flexround", None, "testing:tiny-resnet"), ("pdquant", None, "testing:tiny-resnet"),
    ("nwq", None, "testing:tiny-resnet"), ("mrecg", "qdrop", "testing:tiny-resnet"),
    ("flexround", None, "testing:tiny-decoder"),
])
def test_every_reconstruction_recipe_keeps_the_ranks_in_step(plugin: str, base: str | None, model_id: str,
                                                             tmp_path: Path) -> None:
    # the components of each method (roundings, losses with extras, data transforms, policies, schedulers) keep
    # no state that differs between ranks and change parameters only through their averaged gradients
    ranks = run_data_parallel(tmp_path, plugin=plugin, base=base, model_id=model_id, evaluate_fp=False,
                              eval_samples=64, overrides={"weight.bits": 2, "activation.bits": 4, "recon.iters": 12,
                                                          "recon.act_iters": 6, "calib.num_samples": 32,
                                                          "recon.batch_size": 8})
    assert_ranks_agree(ranks)
    assert sum(r["iters"] for r in ranks[0].records) > 0
