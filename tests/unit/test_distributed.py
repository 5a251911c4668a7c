"""Data parallelism without a model: shards of the global batches, the per-batch random draws, the collectives
on real gloo process groups, and the launcher's pure parts."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lora_trainer import elastic
from lora_trainer.config.schema import DISTRIBUTED_STRATEGIES
from lora_trainer.data.sampler import EpochPlan, RunBatches, run_batches
from lora_trainer.distributed import STRATEGIES, BatchRandom, World, shard_bounds, strategy
from lora_trainer.errors import ExitCode
from lora_trainer.termination import TerminationReport


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_the_processes_share_out_every_global_batch_exactly(world_size):
    plan = EpochPlan(((0, 1, 2, 3, 4, 5, 6), (7, 8, 9)), batch_size=2 * world_size, accumulation=1)
    shards = [
        list(RunBatches(plan, seed=3, epochs=2, world=World(r, world_size), per_process=2)) for r in range(world_size)
    ]
    merged, position = [], [0] * world_size
    for _, _, keys in run_batches(plan, seed=3, epochs=2):
        parts = []
        for rank in range(world_size):
            lo, hi = shard_bounds(len(keys), World(rank, world_size), 2)
            if lo < hi:
                parts += shards[rank][position[rank]]
                position[rank] += 1
        merged.append(parts)
    assert merged == [keys for _, _, keys in run_batches(plan, seed=3, epochs=2)]
    assert position == [len(s) for s in shards]  # nothing left over, nothing missing


def test_a_short_last_batch_leaves_the_last_processes_out():
    assert [shard_bounds(3, World(r, 4), 2) for r in range(4)] == [(0, 2), (2, 3), (3, 3), (3, 3)]


def test_with_stand_ins_a_process_with_no_item_gets_the_batchs_last_one_and_no_batch_is_skipped():
    """fsdp: every process runs every micro-batch's forward (gathering a block is a collective)."""
    plan = EpochPlan(((0, 1, 2, 3, 4, 5, 6, 7),), batch_size=6, accumulation=1)  # batches of 6 and 2
    global_batches = [keys for _, _, keys in run_batches(plan, seed=3, epochs=1)]
    idle = list(RunBatches(plan, seed=3, epochs=1, world=World(1, 2), per_process=3, stand_in=True))
    assert idle == [global_batches[0][3:], global_batches[1][-1:]]
    assert len(list(RunBatches(plan, seed=3, epochs=1, world=World(1, 2), per_process=3))) == 1


def test_a_world_of_one_has_nothing_to_shard_and_runs_as_ddp():
    assert strategy("fsdp", World()).name == "ddp"
    assert strategy("fsdp", World(0, 2)).collective_forward and not strategy("ddp", World(0, 2)).collective_forward
    with pytest.raises(ValueError, match="unknown distributed_strategy"):
        strategy("zero3", World(0, 2))
    assert tuple(STRATEGIES) == DISTRIBUTED_STRATEGIES  # the config's choices are the strategies


def test_every_process_draws_its_items_numbers_as_one_process_would():
    whole = BatchRandom.whole(torch.Generator().manual_seed(5), 5)
    noise, steps = whole.randn((3, 2)), whole.randint(0, 1000)
    for lo, hi in ((0, 2), (2, 4), (4, 5)):
        part = BatchRandom(torch.Generator().manual_seed(5), lo, hi, 5)
        assert torch.equal(part.randn((3, 2)), noise[lo:hi]) and torch.equal(part.randint(0, 1000), steps[lo:hi])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _collectives(rank: int, size: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = World(rank, size, rank)
    world.start("cpu")
    grads = [torch.full((2, 3), float(rank + 1)), torch.full((4,), 10.0 * (rank + 1))]
    world.sum_(grads)
    loss = world.sum_floats(float("nan") if rank == 1 else 1.0, 2.0)
    out.put((rank, grads[0].tolist(), grads[1].tolist(), loss, world.any(rank == 1), world.broadcast({"r": rank})))
    world.stop()


def test_collectives_on_a_real_gloo_group():
    """Gradients summed in one all-reduce; a NaN on one process reaches all (so all stop at that step); one
    process's SIGTERM flag is every process's; the main process's checkpoint reaches the others."""
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_collectives, args=(2, free_port(), queue), nprocs=2, join=True)
    results = sorted(queue.get() for _ in range(2))
    assert [r[0] for r in results] == [0, 1]
    for _, g0, g1, loss, anyone, box in results:
        assert g0 == [[3.0] * 3] * 2 and g1 == [30.0] * 4
        assert loss[0] != loss[0] and loss[1] == 4.0  # NaN everywhere
        assert anyone is True and box == {"r": 0}


# -- the launcher
def args(**values) -> argparse.Namespace:
    return argparse.Namespace(**{name: values.get(name) for name in elastic.FLAGS})


def test_flags_then_the_operators_variables_then_one_process():
    env = {"LORA_NPROC_PER_NODE": "4", "LORA_NNODES": "2", "LORA_RDZV_ENDPOINT": "job-0.svc:29400"}
    s = elastic.settings(args(nnodes=3), env)
    assert (s["nproc_per_node"], s["nnodes"], s["rdzv_endpoint"], s["max_restarts"]) == (4, 3, "job-0.svc:29400", 0)
    assert elastic.wanted(args(), env) and not elastic.wanted(args(), {**env, "RANK": "1"})  # a worker
    assert not elastic.wanted(args(), {})


def test_the_workers_run_the_command_line_without_the_launch_flags():
    argv = ["--config", "c.yaml", "--nproc-per-node", "2", "--set", "lora_rank=4", "--nnodes=2", "--max-restarts", "1"]
    assert elastic.worker_argv(argv) == ["--config", "c.yaml", "--set", "lora_rank=4"]


def test_the_container_passes_on_the_main_processs_report_or_the_first_failure(tmp_path):
    def write(rank, code):
        (tmp_path / f"rank-{rank}.json").write_text(json.dumps({"exitCode": code, "rank": rank}))

    write(1, 0)
    write(2, 5)
    assert elastic.worker_report(tmp_path) == {"exitCode": 5, "rank": 2}
    write(0, 0)
    assert elastic.worker_report(tmp_path) == {"exitCode": 0, "rank": 0}
    (tmp_path / "rank-3.json").write_text(json.dumps({"exitCode": 3, "rank": 3, "permanent": True}))
    assert elastic.worker_report(tmp_path)["rank"] == 3  # the others were stopped because of it
    assert elastic.exit_code_of(-15) == 143 and elastic.exit_code_of(2) == 2


def test_a_workers_permanent_error_signals_the_launcher_and_nothing_else_does(monkeypatch):
    sent = []
    monkeypatch.setattr(elastic.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(elastic.os, "getppid", lambda: 4242)
    worker = {elastic.WORKER_REPORTS_ENV: "/tmp/reports", "RANK": "1"}
    permanent, retried = TerminationReport(), TerminationReport()
    permanent.failed_with(ExitCode.DATASET_INVALID, "DatasetInvalid", "no images")
    retried.failed_with(ExitCode.STORAGE_UNAVAILABLE, "StorageUnavailable", "S3 away")
    elastic.end_launch_if_permanent(retried, worker)  # a restart may help: the agent decides
    elastic.end_launch_if_permanent(permanent, {"RANK": "1"})  # plain torchrun: its own rules
    elastic.end_launch_if_permanent(permanent, {elastic.WORKER_REPORTS_ENV: "/tmp/reports"})  # the launcher
    assert sent == []
    elastic.end_launch_if_permanent(permanent, worker)
    assert sent == [(4242, signal.SIGTERM)]
