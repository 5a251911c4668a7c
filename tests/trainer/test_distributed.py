"""Several processes (gloo on CPU standing in for NCCL on GPUs), launched as a user launches them:
`lora-train --nproc-per-node 2`. N processes with batch b train like one process with batch N*b; runs
resume exactly, also at another process count; SIGTERM, NaN and a dead process stop every process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lora_trainer.errors import ExitCode
from tests.cluster.procs import descendants

from .conftest import LLM_BASE, SD_BASE, final_weights
from .test_families import base as family_base

pytestmark = pytest.mark.slow


def lora_train(tmp_path: Path, cfg: dict, *flags: str, name: str = "run", wait: bool = True):
    """lora-train in its own process group, one OpenMP thread per process (two cores here)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"metrics_port": 0, "save_steps": 0, **cfg, "output_dir": str(tmp_path / name)}))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "LORA_TERMINATION_MESSAGE_PATH": str(tmp_path / f"{name}.termination"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_trainer.cli", "--config", str(path), *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if wait:
        out, _ = proc.communicate(timeout=600)
        return proc.returncode, out
    return proc


def termination(tmp_path: Path, name: str = "run") -> dict:
    return json.loads((tmp_path / f"{name}.termination").read_text())


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


CASES = {
    "sd": dict(SD_BASE, max_train_steps=4),
    "llm": dict(LLM_BASE, max_train_steps=4),
    "llm-packed": dict(LLM_BASE, max_train_steps=4, packing=True),  # shares weighted by the rows' trained tokens
    "flux1": dict(family_base("flux1"), max_train_steps=4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_train_like_one_with_the_global_batch(tmp_path, case):
    """2 processes x batch 2 against 1 process x batch 4: the same items, noise and mean loss per step, so
    the same weights up to the order of float additions (measured differences ~1e-7)."""
    cfg = {**CASES[case], "batch_size": 2}
    code, out = lora_train(tmp_path, cfg, "--nproc-per-node", "2", name="two")
    assert code == 0, out[-3000:]
    code, out = lora_train(tmp_path, {**cfg, "batch_size": 4}, name="one")
    assert code == 0, out[-3000:]
    assert_close(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"))
    message = termination(tmp_path, "two")
    assert (message["status"], message["rank"], message["worldSize"]) == ("succeeded", 0, 2)
    assert message["artifacts"][0]["uri"].endswith("two/pytorch_lora_weights.safetensors")
    assert out.count("done: step 4") == 1  # the main process reports the outputs, once


def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


SLOW = dict(SD_BASE, batch_size=2, max_train_steps=60, save_steps=10)  # long enough to be caught mid-run


def test_sigterm_stops_every_process_at_one_step_with_one_checkpoint_and_the_run_resumes_exactly(tmp_path):
    straight_code, out = lora_train(tmp_path, SLOW, "--nproc-per-node", "2", name="straight")
    assert straight_code == 0, out[-3000:]
    proc = lora_train(tmp_path, SLOW, "--nproc-per-node", "2", name="resumed", wait=False)
    wait_for(tmp_path / "resumed/checkpoints/state_step_10/manifest.json")
    os.killpg(proc.pid, signal.SIGTERM)  # the pod's whole process group, as Kubernetes signals a container
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED, out[-3000:]
    message = termination(tmp_path, "resumed")
    assert message["status"] == "interrupted" and message["rank"] == 0
    stopped = message["lastCheckpoint"]["step"]
    assert (tmp_path / f"resumed/checkpoints/state_step_{stopped}/manifest.json").is_file()
    code, out = lora_train(tmp_path, {**SLOW, "resume": "latest"}, "--nproc-per-node", "2", name="resumed")
    assert code == 0, out[-3000:]
    a, b = final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def test_a_checkpoint_of_two_processes_resumes_in_one_with_the_same_global_batch(tmp_path):
    cfg = dict(SD_BASE, batch_size=2, max_train_steps=6, save_steps=3)
    code, out = lora_train(tmp_path, cfg, "--nproc-per-node", "2", name="two")
    assert code == 0, out[-3000:]
    checkpoint = str(tmp_path / "two/checkpoints/state_step_3")
    code, out = lora_train(tmp_path, {**cfg, "batch_size": 4, "resume": checkpoint}, name="one")  # 1 x 4 == 2 x 2
    assert code == 0, out[-3000:]
    assert "resumed from" in out
    assert_close(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    # a per-process batch that changes the global batch is refused, naming it
    code, out = lora_train(tmp_path, {**cfg, "resume": checkpoint}, name="other")
    assert code == ExitCode.CONFIG_INVALID and "batch_size 4 -> 2" in out, out[-2000:]


def test_nan_on_the_processes_stops_them_all_with_the_step_named_and_no_restart(tmp_path):
    """A permanent error ends the launch at once, whatever --max-restarts allows: a restart would diverge again."""
    cfg = dict(SD_BASE, learning_rate=1e30, max_train_steps=20)
    code, out = lora_train(tmp_path, cfg, "--nproc-per-node", "2", "--max-restarts", "2")
    assert code == ExitCode.TRAINING_DIVERGED, out[-3000:]
    assert out.count("lora-train INFO training 20 steps") == 1, out[-3000:]  # one round of workers
    message = termination(tmp_path)
    assert message["reason"] == "TrainingDiverged" and "at step" in message["error"] and message["permanent"]


def test_a_process_that_dies_ends_the_others_and_a_restart_continues_from_the_checkpoint(tmp_path):
    """kill -9 of one worker: without restarts every process ends non-zero within seconds; with
    --max-restarts 1 the group starts again from the newest checkpoint and ends as an undisturbed run."""
    code, out = lora_train(tmp_path, SLOW, "--nproc-per-node", "2", name="undisturbed")
    assert code == 0, out[-3000:]
    for restarts, name in (("0", "dies"), ("1", "restarts")):
        proc = lora_train(
            tmp_path,
            {**SLOW, "resume": "latest"},
            "--nproc-per-node",
            "2",
            "--max-restarts",
            restarts,
            name=name,
            wait=False,
        )
        wait_for(tmp_path / f"{name}/checkpoints/state_step_10/manifest.json")
        worker = worker_pids(proc.pid)[-1]  # one of the two training processes
        started = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
        if restarts == "0":
            assert proc.returncode != 0 and time.monotonic() - started < 120, out[-3000:]
        else:
            assert proc.returncode == 0, out[-3000:]
            a, b = final_weights(tmp_path / name), final_weights(tmp_path / "undisturbed")
            assert all(torch.equal(a[k], b[k]) for k in a)


def worker_pids(launcher: int) -> list[int]:
    """The training processes the launcher started: its descendants running lora_trainer.cli."""

    def command(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""  # gone meanwhile

    return [pid for pid in descendants(launcher) if b"lora_trainer.cli" in command(pid)]
