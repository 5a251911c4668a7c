"""A trainer image is the user's: a pod that serves a gzip bomb or an endless page as /metrics and ends with a
termination message breaking every rule must not stall the operator, grow it, or put anything into status,
while an honest job beside it trains and reports progress as usual (issue 14)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.e2e import operator_env as env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
HOSTILE_IMAGE = "ghcr.io/mallory/hostile-trainer:1"  # tests/e2e/hostile_image/bin/lora-train


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the process's peak resident set
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


class ProgressLog(threading.Thread):
    """The distinct status.progress.step values a job shows while it runs."""

    def __init__(self, jobs, name):
        super().__init__(daemon=True)
        self.jobs, self.name, self.steps, self.done = jobs, name, [], threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            step = (self.jobs.status(self.name).get("progress") or {}).get("step")
            if step is not None and (not self.steps or self.steps[-1] != step):
                self.steps.append(step)


def test_hostile_pods_neither_stall_the_operator_nor_reach_status(jobs, operator):
    rss_before = peak_rss_mib(operator.proc.pid)
    for name in ("bomb", "endless"):
        jobs.apply(env.sd_manifest(name, jobs.bucket, image=HOSTILE_IMAGE))
    jobs.wait_phase("bomb", "Running", timeout=120)
    jobs.apply(env.sd_manifest("honest", jobs.bucket, steps=16, save_steps=4))
    progress = ProgressLog(jobs, "honest")
    progress.start()
    started = time.monotonic()
    honest = jobs.wait_phase("honest", "Succeeded", timeout=420)
    progress.done.set()
    progress.join()
    assert len(progress.steps) >= 2, f"the honest job's progress never moved while bombs were served: {progress.steps}"
    assert honest["artifacts"] and honest["lastCheckpoint"]["uri"].startswith(f"s3://{jobs.bucket}/out/honest/")

    for name in ("bomb", "endless"):
        status = jobs.wait_phase(name, "Succeeded", timeout=240)  # it exited 0; nothing it said is believed
        json.dumps(status, allow_nan=False)
        assert "artifacts" not in status and "lastCheckpoint" not in status, status
        assert "loss" not in (status.get("progress") or {}), status
        assert status["reason"] == "TrainingSucceeded"
        reasons = {e["reason"]: e["message"] for e in jobs.events(name)}
        assert "TerminationMessageInvalid" in reasons, reasons
        for field in ("step", "totalSteps", "loss", "artifacts[0].uri", "artifacts[1]", "reason", "surprise"):
            assert field in reasons["TerminationMessageInvalid"], reasons["TerminationMessageInvalid"]
        assert "MetricsRefused" in reasons or name == "endless", reasons
        assert sum(e["reason"] == "TerminationMessageInvalid" for e in jobs.events(name)) == 1  # once per pod
    assert "Content-Encoding gzip" in {e["reason"]: e["message"] for e in jobs.events("bomb")}["MetricsRefused"]
    endless = {e["reason"]: e["message"] for e in jobs.events("endless")}.get("MetricsRefused", "")
    assert "more than 262144 bytes" in endless or endless == "", endless

    grown = peak_rss_mib(operator.proc.pid) - rss_before
    assert grown < 100, f"the operator's peak RSS grew {grown:.0f} MiB while serving hostile pages"
    assert operator.metric("lora_operator_reconcile_errors_total") == 0
    assert time.monotonic() - started < 420
