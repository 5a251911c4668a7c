"""The status state machine: a LoRATrainingJob's phase, conditions and progress from what the operator observes.

`compute_status(observed, now)` reads the job's spec and current status, its batch/v1 Job, the Job's
pods (read with pods.py) and a fresh progress sample from the trainer's metrics endpoint, and returns
the new status; `status_patch` turns it into the merge patch to send. Nothing here talks to the API
server, so every transition is tested as a table (tests/unit/test_operator_status.py).
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .pods import (
    PodOutcome,
    exit_summary,
    job_condition,
    pod_finished,
    pod_order,
    pod_outcome,
    trainer_running,
    waiting_reason,
)
from .progress import ProgressSample
from .reasons import PERMANENT_EXIT_REASONS, Reason, shorten


class Phase(str, enum.Enum):
    PENDING = "Pending"
    LABELING = "Labeling"  # the trainer pod runs and auto_label (spec.dataset.autoLabel) is captioning
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    def is_terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)

    @classmethod
    def parse(cls, value: Any) -> Phase:
        try:
            return cls(value)
        except ValueError:
            return cls.PENDING


def is_terminal(status: dict[str, Any] | None) -> bool:
    return bool(status) and Phase.parse(status.get("phase")).is_terminal()


CONDITION_TYPES = ("Running", "Succeeded", "Failed", "Suspended")
PHASE_CONDITION = {
    Phase.LABELING: "Running",
    Phase.RUNNING: "Running",
    Phase.SUCCEEDED: "Succeeded",
    Phase.FAILED: "Failed",
    Phase.SUSPENDED: "Suspended",
}


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None


@dataclass
class Observed:
    """Everything the status is computed from."""

    generation: int
    spec: dict[str, Any]
    status: dict[str, Any]
    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    sample: ProgressSample | None = None
    config_error: str | None = None  # the trainer config did not validate: fail before any pod


@dataclass(frozen=True)
class Verdict:
    phase: Phase
    reason: str
    message: str


def decide(obs: Observed) -> Verdict:
    """The phase, reason and message for what is observed (the job is known not to be terminal)."""
    if obs.config_error:
        return Verdict(Phase.FAILED, Reason.CONFIG_INVALID, shorten(obs.config_error))
    job = obs.job
    if job is None:
        return Verdict(Phase.PENDING, Reason.CREATED, "creating the training Job")
    pods = sorted(obs.pods, key=pod_order)
    if job_condition(job, "Complete"):
        return Verdict(Phase.SUCCEEDED, Reason.COMPLETED, "the trainer finished; weights are in spec.output.uri")
    failed = job_condition(job, "Failed")
    if failed:
        return _failure(failed, pods, obs.spec)
    live = [p for p in pods if not pod_finished(p)]
    if (job.get("spec") or {}).get("suspend"):
        if any(trainer_running(p) for p in live):
            return Verdict(
                Phase.RUNNING,
                Reason.SUSPENDING,
                "suspend requested: the trainer is writing its checkpoint before it stops",
            )
        return Verdict(
            Phase.SUSPENDED, Reason.SUSPENDED, "suspended; set spec.suspend to false to resume from the last checkpoint"
        )
    if live:
        pod = live[-1]
        name = pod["metadata"]["name"]
        if trainer_running(pod):
            labeling = obs.sample.labeling() if obs.sample else None
            if labeling:
                return Verdict(
                    Phase.LABELING,
                    Reason.LABELING,
                    f"captioning images before training on pod {name}: {labeling[0]} of {labeling[1]} done",
                )
            return Verdict(Phase.RUNNING, Reason.TRAINING, f"training on pod {name}")
        waiting = waiting_reason(pod)
        if waiting:
            return Verdict(Phase.PENDING, *waiting)
        previous = [p for p in pods if pod_finished(p)]
        if previous:
            outcome = pod_outcome(previous[-1])
            return Verdict(
                Phase.PENDING, _retry_reason(outcome), f"retrying after {outcome.message}; pod {name} is starting"
            )
        return Verdict(Phase.PENDING, Reason.POD_PENDING, f"pod {name} is starting")
    finished = [p for p in pods if pod_finished(p)]
    if finished and (finished[-1].get("status") or {}).get("phase") == "Succeeded":
        return Verdict(Phase.RUNNING, Reason.COMPLETING, "the trainer finished; waiting for the Job to complete")
    if finished:
        outcome = pod_outcome(finished[-1])
        return Verdict(Phase.PENDING, _retry_reason(outcome), f"{outcome.message}; waiting for the next attempt")
    return Verdict(Phase.PENDING, Reason.CREATED, "waiting for the Job controller to create the trainer pod")


def _retry_reason(outcome: PodOutcome) -> str:
    if outcome.reason in (Reason.EVICTED, Reason.OOM_KILLED):
        return outcome.reason
    return Reason.RESTARTING


def _failure(condition: dict[str, Any], pods: list[dict[str, Any]], spec: dict[str, Any]) -> Verdict:
    why = condition.get("reason") or ""
    finished = [p for p in pods if pod_finished(p)]
    if why == "PodFailurePolicy":
        for pod in reversed(finished):
            outcome = pod_outcome(pod)
            if outcome.exit_code in PERMANENT_EXIT_REASONS:
                return Verdict(Phase.FAILED, outcome.reason, outcome.message)
        return Verdict(Phase.FAILED, Reason.JOB_FAILED, shorten(condition.get("message")))
    if why == "BackoffLimitExceeded":
        limit = spec.get("backoffLimit", 3)  # 3: the CRD's default
        text = f"the trainer failed {limit + 1} time(s) (backoffLimit {limit})"
        if finished:
            text += f"; last failure: {pod_outcome(finished[-1]).message}"
        return Verdict(Phase.FAILED, Reason.BACKOFF_LIMIT_EXCEEDED, shorten(text))
    if why == "DeadlineExceeded":
        return Verdict(
            Phase.FAILED,
            Reason.DEADLINE_EXCEEDED,
            f"the run was active longer than spec.activeDeadlineSeconds ({spec.get('activeDeadlineSeconds')} s)",
        )
    return Verdict(Phase.FAILED, Reason.JOB_FAILED, shorten(f"{why}: {condition.get('message', '')}"))


def compute_status(obs: Observed, now: datetime) -> dict[str, Any]:
    """The complete new status. Never call it for a terminal job: a terminal job stays as it is."""
    old = obs.status or {}
    new = copy.deepcopy(old)
    verdict = decide(obs)
    stamp = rfc3339(now)
    new["phase"] = verdict.phase.value
    new["reason"] = verdict.reason
    new["message"] = verdict.message
    new["observedGeneration"] = obs.generation
    new["conditions"] = conditions(old.get("conditions") or [], verdict, obs.generation, stamp)
    _track_attempts(new, obs.pods)
    if obs.job is not None and not new.get("startTime"):
        new["startTime"] = (obs.job.get("metadata") or {}).get("creationTimestamp") or stamp
    summaries = [s for s in (exit_summary(p) for p in sorted(obs.pods, key=pod_order)) if s]
    for summary in summaries:
        _apply_checkpoint(new, summary.get("lastCheckpoint"), stamp)
    if summaries:
        _apply_exit_progress(new, summaries[-1], stamp)
    if obs.sample is not None:
        _apply_sample(new, obs.sample, stamp)
    if verdict.phase is not Phase.RUNNING and "eta" in (new.get("progress") or {}):
        new["progress"] = {k: v for k, v in new["progress"].items() if k != "eta"}  # no ETA while stopped
    if verdict.phase is Phase.SUCCEEDED:
        done = next((s for s in reversed(summaries) if s.get("status") == "succeeded"), None)
        if done:
            _apply_final(new, done, stamp)
    if verdict.phase.is_terminal():
        completion = ((obs.job or {}).get("status") or {}).get("completionTime")
        new["completionTime"] = completion if verdict.phase is Phase.SUCCEEDED and completion else stamp
    return new


def conditions(old: list[dict[str, Any]], verdict: Verdict, generation: int, stamp: str) -> list[dict[str, Any]]:
    """Running/Succeeded/Failed/Suspended: the phase's own condition True, the others False; every
    condition carries the phase's reason and message. lastTransitionTime moves only on a flip."""
    by_type = {c.get("type"): c for c in old}
    active = PHASE_CONDITION.get(verdict.phase)
    out = []
    for ctype in CONDITION_TYPES:
        status = "True" if ctype == active else "False"
        before = by_type.get(ctype) or {}
        changed = before.get("status") != status
        out.append(
            {
                "type": ctype,
                "status": status,
                "reason": verdict.reason,
                "message": verdict.message,
                "observedGeneration": generation,
                "lastTransitionTime": stamp
                if changed or not before.get("lastTransitionTime")
                else before["lastTransitionTime"],
            }
        )
    return out


def _track_attempts(new: dict[str, Any], pods: Iterable[dict[str, Any]]) -> None:
    """attempts counts trainer pods ever started; pods deleted since (evicted) still count."""
    ordered = sorted(pods, key=pod_order)
    if not ordered:
        return
    seen = new.get("currentPod") or {}
    mark = (seen.get("creationTimestamp") or "", seen.get("name") or "")
    fresh = [p for p in ordered if pod_order(p) > mark] if seen else ordered
    if fresh:
        new["attempts"] = int(new.get("attempts") or 0) + len(fresh)
        last = fresh[-1]["metadata"]
        new["currentPod"] = {"name": last["name"], "creationTimestamp": last.get("creationTimestamp")}


def _apply_checkpoint(new: dict[str, Any], ckpt: Any, stamp: str) -> None:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("step"), int):
        return
    current = new.get("lastCheckpoint") or {}
    if current.get("step") is not None and current["step"] > ckpt["step"]:
        return
    if current.get("step") == ckpt["step"] and current.get("uri") == ckpt.get("uri"):
        return
    new["lastCheckpoint"] = {"step": ckpt["step"], "uri": str(ckpt.get("uri") or ""), "time": ckpt.get("time") or stamp}


def _apply_exit_progress(new: dict[str, Any], summary: dict[str, Any], stamp: str) -> None:
    """A trainer that stopped (SIGTERM checkpoint, crash) says where it got to; scrapes may lag behind."""
    step = summary.get("step")
    progress = dict(new.get("progress") or {})
    if not isinstance(step, int) or step <= (progress.get("step") or 0):
        return
    progress["step"] = step
    if isinstance(summary.get("totalSteps"), int):
        progress["totalSteps"] = summary["totalSteps"]
    if isinstance(summary.get("loss"), (int, float)):
        progress["loss"] = summary["loss"]
    progress["updatedAt"] = stamp
    new["progress"] = progress


def _apply_sample(new: dict[str, Any], sample: ProgressSample, stamp: str) -> None:
    if not sample.total_steps:  # the trainer serves metrics before its setup knows the run's length
        return
    progress = sample.as_status()
    old = dict(new.get("progress") or {})
    old.pop("updatedAt", None)
    if progress and progress != old:
        new["progress"] = {**progress, "updatedAt": stamp}
    if sample.checkpoint_step is not None:
        current = new.get("lastCheckpoint") or {}
        if current.get("step") is None or sample.checkpoint_step > current["step"]:
            new["lastCheckpoint"] = {"step": sample.checkpoint_step, "uri": sample.checkpoint_uri or "", "time": stamp}


def _apply_final(new: dict[str, Any], summary: dict[str, Any], stamp: str) -> None:
    artifacts = []
    for item in summary.get("artifacts") or []:
        if not isinstance(item, dict) or not item.get("uri"):
            continue
        artifact = {"uri": str(item["uri"]), "format": str(item.get("format") or "")}
        if isinstance(item.get("sha256"), str) and len(item["sha256"]) == 64:
            artifact["sha256"] = item["sha256"].lower()
        for key in ("step", "size"):
            if isinstance(item.get(key), int):
                artifact[key] = item[key]
        artifacts.append(artifact)
    if artifacts:
        new["artifacts"] = artifacts
    progress = dict(new.get("progress") or {})
    for key, src in (("step", "step"), ("totalSteps", "totalSteps"), ("loss", "loss")):
        if summary.get(src) is not None:
            progress[key] = summary[src]
    if progress:
        progress["eta"] = "0s"
        old = dict(new.get("progress") or {})
        old.pop("updatedAt", None)
        cmp = dict(progress)
        cmp.pop("updatedAt", None)
        if cmp != old:
            progress["updatedAt"] = stamp
        new["progress"] = progress


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) from old to new: changed keys, nested mappings diffed the same way,
    keys that disappeared set to null (lists are replaced whole, as merge patch does)."""
    old = old or {}
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if isinstance(value, dict) and isinstance(before, dict):
            patch[key] = status_patch(before, value)
        else:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch
