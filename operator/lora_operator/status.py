"""A LoRATrainingJob's status as a pure function of what the operator observes.

`compute_status(observed, now)` reads the job's spec and current status, its batch/v1 Job, the Job's
pods and a fresh progress sample from the trainer's metrics endpoint, and returns the new status.
Nothing here talks to the API server, so every transition is tested as a table
(tests/unit/test_status.py).
"""

from __future__ import annotations

import copy
import enum
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from .names import CONTAINER
from .progress import ProgressSample


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
    def parse(cls, value: Any) -> "Phase":
        try:
            return cls(value)
        except ValueError:
            return cls.PENDING


def is_terminal(status: dict[str, Any] | None) -> bool:
    return bool(status) and Phase.parse(status.get("phase")).is_terminal()


class Reason:
    """Condition reasons (CamelCase constants; `kubectl get ltj -o wide` shows them in REASON)."""

    # Pending
    CREATED = "JobCreated"
    POD_PENDING = "PodPending"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"
    RESTARTING = "Restarting"  # the previous pod failed; the Job will start another
    EVICTED = "Evicted"  # the previous pod was evicted or preempted (does not count against backoffLimit)
    OOM_KILLED = "OOMKilled"
    # Labeling / Running / Suspended
    LABELING = "Labeling"
    TRAINING = "Training"
    COMPLETING = "Completing"  # the trainer exited 0; the Job controller has not marked it Complete yet
    SUSPENDING = "Suspending"
    SUSPENDED = "Suspended"
    # Succeeded
    COMPLETED = "TrainingSucceeded"
    # Failed, permanent trainer exits (docs/trainer-operator.md)
    CONFIG_INVALID = "ConfigInvalid"
    DATASET_INVALID = "DatasetInvalid"
    MODEL_INVALID = "ModelInvalid"
    TRAINING_DIVERGED = "TrainingDiverged"
    STORAGE_INVALID = "StorageInvalid"
    # Failed, by the Job controller
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    JOB_FAILED = "JobFailed"  # any other Job failure reason
    # Retried failures, in messages of Restarting
    CRASHED = "Crashed"
    INTERRUPTED = "Interrupted"


# Trainer exit codes (lora_trainer.errors.ExitCode) -> reasons. The permanent ones fail the Job at once
# through its podFailurePolicy; builders.py builds that rule from the same table.
PERMANENT_EXIT_REASONS: dict[int, str] = {
    2: Reason.CONFIG_INVALID,
    3: Reason.DATASET_INVALID,
    4: Reason.MODEL_INVALID,
    5: Reason.TRAINING_DIVERGED,
    6: Reason.STORAGE_INVALID,
}
RETRIED_EXIT_REASONS: dict[int, str] = {1: "Crashed", 7: "OutputFailed", 8: "StorageUnavailable", 143: "Interrupted",
                                        137: "Killed"}

CONDITION_TYPES = ("Running", "Succeeded", "Failed", "Suspended")
PHASE_CONDITION = {Phase.LABELING: "Running", Phase.RUNNING: "Running", Phase.SUCCEEDED: "Succeeded",
                   Phase.FAILED: "Failed", Phase.SUSPENDED: "Suspended"}
WARNING_REASONS = frozenset({
    Reason.UNSCHEDULABLE, Reason.IMAGE_PULL_FAILED, Reason.CONTAINER_CONFIG_ERROR, Reason.RESTARTING,
    Reason.EVICTED, Reason.OOM_KILLED, *PERMANENT_EXIT_REASONS.values(), Reason.BACKOFF_LIMIT_EXCEEDED,
    Reason.DEADLINE_EXCEEDED, Reason.JOB_FAILED,
})
MAX_MESSAGE = 2000


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _short(text: str | None, limit: int = MAX_MESSAGE) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Reading pods and Jobs


def termination_summary(message: str | None) -> dict[str, Any] | None:
    """The trainer's one-line JSON exit summary, or None when the message is not one."""
    if not message:
        return None
    for line in reversed(message.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and "status" in doc:
                return doc
    return None


def trainer_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == CONTAINER), statuses[0] if statuses else {})


def terminated_state(pod: dict[str, Any]) -> dict[str, Any] | None:
    status = trainer_status(pod)
    return (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get("terminated")


def pod_condition(pod: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == ctype), None)


def job_condition(job: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    if not job:
        return None
    return next((c for c in (job.get("status") or {}).get("conditions") or []
                 if c.get("type") == ctype and c.get("status") == "True"), None)


def pod_finished(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def pod_order(pod: dict[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return meta.get("creationTimestamp") or "", meta.get("name") or ""


@dataclass(frozen=True)
class PodOutcome:
    """Why a trainer pod ended: a reason constant and a message in the pod's own words."""

    reason: str
    message: str
    exit_code: int | None = None
    disrupted: bool = False  # evicted or preempted: not counted against backoffLimit
    summary: dict[str, Any] | None = None


def pod_outcome(pod: dict[str, Any]) -> PodOutcome:
    """Classify a finished (or finishing) trainer pod."""
    status = pod.get("status") or {}
    name = (pod.get("metadata") or {}).get("name", "?")
    term = terminated_state(pod) or {}
    code = term.get("exitCode")
    summary = termination_summary(term.get("message"))
    said = (summary or {}).get("error") or (term.get("message") if summary is None else "") or ""
    disruption = pod_condition(pod, "DisruptionTarget")
    if status.get("reason") == "Evicted" or (disruption and disruption.get("status") == "True"):
        why = status.get("message") or (disruption or {}).get("message") or (disruption or {}).get("reason") or ""
        return PodOutcome(Reason.EVICTED, _short(f"pod {name} was evicted: {why}".rstrip(": ")), code, True, summary)
    if status.get("reason") == "DeadlineExceeded":
        return PodOutcome(Reason.DEADLINE_EXCEEDED, _short(f"pod {name}: {status.get('message', '')}"), code,
                          summary=summary)
    if term.get("reason") == "OOMKilled":
        return PodOutcome(Reason.OOM_KILLED, _short(f"pod {name}: the trainer ran out of memory (OOMKilled, "
                                                    f"exit code {code}); raise spec.resources.memory"), code,
                          summary=summary)
    if code in PERMANENT_EXIT_REASONS:
        reason = PERMANENT_EXIT_REASONS[code]
        return PodOutcome(reason, _short(said or f"the trainer exited with code {code} ({reason})"), code,
                          summary=summary)
    if code is None:
        return PodOutcome(Reason.CRASHED, f"pod {name} ended without an exit code", None, summary=summary)
    kind = RETRIED_EXIT_REASONS.get(code, "Crashed")
    text = f"pod {name}: the trainer exited with code {code} ({kind})"
    if said:
        text += f": {said}"
    return PodOutcome(Reason.RESTARTING, _short(text), code, summary=summary)


def waiting_reason(pod: dict[str, Any]) -> tuple[str, str] | None:
    """Why a pod is not running yet, as (reason, message) for the Pending condition."""
    scheduled = pod_condition(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return Reason.UNSCHEDULABLE, _short(scheduled.get("message") or "no node fits the trainer pod")
    waiting = (trainer_status(pod).get("state") or {}).get("waiting") or {}
    why = waiting.get("reason")
    if why in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"):
        image = next((c.get("image") for c in (pod.get("spec") or {}).get("containers") or []
                      if c.get("name") == CONTAINER), "")
        return Reason.IMAGE_PULL_FAILED, _short(f"{why}: {waiting.get('message') or image}")
    if why in ("CreateContainerConfigError", "CreateContainerError", "RunContainerError"):
        return Reason.CONTAINER_CONFIG_ERROR, _short(f"{why}: {waiting.get('message', '')}")
    return None


# ---------------------------------------------------------------------------------------------
# The state machine


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
        return Verdict(Phase.FAILED, Reason.CONFIG_INVALID, _short(obs.config_error))
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
        if any(_running(p) for p in live):
            return Verdict(Phase.RUNNING, Reason.SUSPENDING,
                           "suspend requested: the trainer is writing its checkpoint before it stops")
        return Verdict(Phase.SUSPENDED, Reason.SUSPENDED, "suspended; set spec.suspend to false to resume "
                                                          "from the last checkpoint")
    if live:
        pod = live[-1]
        name = pod["metadata"]["name"]
        if _running(pod):
            labeling = obs.sample.labeling() if obs.sample else None
            if labeling:
                return Verdict(Phase.LABELING, Reason.LABELING,
                               f"captioning images before training on pod {name}: {labeling[0]} of {labeling[1]} done")
            return Verdict(Phase.RUNNING, Reason.TRAINING, f"training on pod {name}")
        waiting = waiting_reason(pod)
        if waiting:
            return Verdict(Phase.PENDING, *waiting)
        previous = [p for p in pods if pod_finished(p)]
        if previous:
            outcome = pod_outcome(previous[-1])
            return Verdict(Phase.PENDING, _retry_reason(outcome), f"retrying after {outcome.message}; "
                                                                   f"pod {name} is starting")
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


def _running(pod: dict[str, Any]) -> bool:
    return "running" in (trainer_status(pod).get("state") or {})


def _failure(condition: dict[str, Any], pods: list[dict[str, Any]], spec: dict[str, Any]) -> Verdict:
    why = condition.get("reason") or ""
    finished = [p for p in pods if pod_finished(p)]
    if why == "PodFailurePolicy":
        for pod in reversed(finished):
            outcome = pod_outcome(pod)
            if outcome.exit_code in PERMANENT_EXIT_REASONS:
                return Verdict(Phase.FAILED, outcome.reason, outcome.message)
        return Verdict(Phase.FAILED, Reason.JOB_FAILED, _short(condition.get("message")))
    if why == "BackoffLimitExceeded":
        limit = spec.get("backoffLimit", 3)
        text = f"the trainer failed {limit + 1} time(s) (backoffLimit {limit})"
        if finished:
            text += f"; last failure: {pod_outcome(finished[-1]).message}"
        return Verdict(Phase.FAILED, Reason.BACKOFF_LIMIT_EXCEEDED, _short(text))
    if why == "DeadlineExceeded":
        return Verdict(Phase.FAILED, Reason.DEADLINE_EXCEEDED,
                       f"the run was active longer than spec.activeDeadlineSeconds "
                       f"({spec.get('activeDeadlineSeconds')} s)")
    return Verdict(Phase.FAILED, Reason.JOB_FAILED, _short(f"{why}: {condition.get('message', '')}"))


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
    summaries = [s for s in (_summary(p) for p in sorted(obs.pods, key=pod_order)) if s]
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
        out.append({
            "type": ctype,
            "status": status,
            "reason": verdict.reason,
            "message": verdict.message,
            "observedGeneration": generation,
            "lastTransitionTime": stamp if changed or not before.get("lastTransitionTime")
            else before["lastTransitionTime"],
        })
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


def _summary(pod: dict[str, Any]) -> dict[str, Any] | None:
    term = terminated_state(pod)
    return termination_summary((term or {}).get("message"))


def _apply_checkpoint(new: dict[str, Any], ckpt: Any, stamp: str) -> None:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("step"), int):
        return
    current = new.get("lastCheckpoint") or {}
    if current.get("step") is not None and current["step"] > ckpt["step"]:
        return
    if current.get("step") == ckpt["step"] and current.get("uri") == ckpt.get("uri"):
        return
    new["lastCheckpoint"] = {"step": ckpt["step"], "uri": str(ckpt.get("uri") or ""),
                             "time": ckpt.get("time") or stamp}


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
            new["lastCheckpoint"] = {"step": sample.checkpoint_step, "uri": sample.checkpoint_uri or "",
                                     "time": stamp}


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


def status_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    return (old or {}) != new


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


@dataclass(frozen=True)
class Transition:
    type: str  # Normal or Warning
    reason: str
    message: str


def transitions(old: dict[str, Any] | None, new: dict[str, Any]) -> list[Transition]:
    """Kubernetes Events for what changed between two statuses."""
    old = old or {}
    events: list[Transition] = []
    if old.get("phase") != new.get("phase") or old.get("reason") != new.get("reason"):
        reason = new.get("reason") or new.get("phase") or "Unknown"
        warning = new.get("phase") == Phase.FAILED.value or reason in WARNING_REASONS
        text = f"{new.get('phase')}: {new.get('message', '')}".rstrip(": ")
        events.append(Transition("Warning" if warning else "Normal", reason, _short(text, 1000)))
    if (new.get("attempts") or 0) > (old.get("attempts") or 0) and new.get("currentPod"):
        events.append(Transition("Normal", "AttemptStarted",
                                 f"attempt {new['attempts']}: trainer pod {new['currentPod']['name']}"))
    old_ckpt = (old.get("lastCheckpoint") or {}).get("step")
    new_ckpt = (new.get("lastCheckpoint") or {}).get("step")
    if new_ckpt is not None and new_ckpt != old_ckpt:
        events.append(Transition("Normal", "Checkpoint", f"checkpoint at step {new_ckpt}: "
                                                          f"{(new.get('lastCheckpoint') or {}).get('uri', '')}"))
    return events
