"""The status state machine: a LoRATrainingJob's phase, conditions and progress from what the operator observes.

`compute_status(observed, now)` reads the job's spec and current status, its batch/v1 Job, the Job's
pods (read with pods.py) and a fresh progress sample from the trainer's metrics endpoint, and returns
the new status; `status_patch` turns it into the merge patch to send. `plan_group` decides when a
multi-node job whose workers cannot all be scheduled is released (its Job suspended) and retried.
Nothing here talks to the API server, so every transition is tested as a table
(tests/unit/test_operator_status.py).
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .pods import (
    PodOutcome,
    completion_index,
    exit_summary,
    group_size,
    job_condition,
    pod_condition,
    pod_finished,
    pod_order,
    pod_outcome,
    trainer_running,
    waiting_reason,
)
from .progress import ProgressSample
from .reasons import PERMANENT_EXIT_REASONS, Reason, shorten
from .settings import Settings
from .termination import under


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
    refused: tuple[str, str] | None = None  # (reason, message): the job may not start, e.g. its output is in use


@dataclass(frozen=True)
class Verdict:
    phase: Phase
    reason: str
    message: str


def decide(obs: Observed) -> Verdict:
    """The phase, reason and message for what is observed (the job is known not to be terminal)."""
    if obs.config_error:
        return Verdict(Phase.FAILED, Reason.CONFIG_INVALID, shorten(obs.config_error))
    if obs.refused:
        return Verdict(Phase.FAILED, obs.refused[0], shorten(obs.refused[1]))
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
        released = (obs.status or {}).get("scheduling") or {}
        if not obs.spec.get("suspend") and released.get("retryAt"):
            return _released(released)
        if any(trainer_running(p) for p in live):
            return Verdict(
                Phase.RUNNING,
                Reason.SUSPENDING,
                "suspend requested: the trainer is writing its checkpoint before it stops",
            )
        return Verdict(
            Phase.SUSPENDED, Reason.SUSPENDED, "suspended; set spec.suspend to false to resume from the last checkpoint"
        )
    nodes = group_size(obs.spec)
    if nodes > 1:
        return _decide_group(obs, pods, nodes)
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


def _released(scheduling: dict[str, Any]) -> Verdict:
    """A multi-node job the operator suspended because its workers could not all be scheduled."""
    text = (
        f"{scheduling.get('message') or 'the workers could not all be scheduled'}; every worker was released, "
        f"so the group holds no node; retrying at {scheduling['retryAt']} (release {scheduling.get('releases', 1)})"
    )
    return Verdict(Phase.PENDING, Reason.WORKERS_UNSCHEDULABLE, shorten(text))


def _decide_group(obs: Observed, pods: list[dict[str, Any]], nodes: int) -> Verdict:
    """The phase of a running (not suspended, not finished) multi-node job: Running once every worker runs
    (or has finished), otherwise Pending with what holds the group back, naming the worker."""
    latest = newest_by_index(pods)
    workers = [latest.get(i) for i in range(nodes)]
    unschedulable = [p for p in workers if p is not None and _unschedulable(p)]
    if unschedulable:
        why = (waiting_reason(unschedulable[0]) or ("", ""))[1]
        return Verdict(
            Phase.PENDING,
            Reason.UNSCHEDULABLE,
            shorten(f"{len(unschedulable)} of {nodes} workers cannot be scheduled: {why}"),
        )
    if all(p is not None and (_running(p) or _phase(p) == "Succeeded") for p in workers):
        return _group_running(obs, [p for p in workers if p is not None], nodes)
    for index, pod in enumerate(workers):
        waiting = waiting_reason(pod) if pod is not None and not pod_finished(pod) else None
        if waiting:
            return Verdict(Phase.PENDING, waiting[0], shorten(f"worker {index} (pod {_name(pod)}): {waiting[1]}"))
    failure = _group_failure(pods, workers)
    if failure:
        index, outcome = failure
        text = f"worker {index}: {outcome.message}; it is replaced and the group restarts from the newest checkpoint"
        return Verdict(Phase.PENDING, _retry_reason(outcome), shorten(text))
    if not pods:
        return Verdict(Phase.PENDING, Reason.CREATED, "waiting for the Job controller to create the worker pods")
    running = sum(1 for p in workers if p is not None and _running(p))
    starting = [str(i) for i, p in enumerate(workers) if p is None or not _running(p)]
    return Verdict(
        Phase.PENDING,
        Reason.POD_PENDING,
        shorten(f"{running} of {nodes} workers running; worker(s) {', '.join(starting)} starting"),
    )


def _group_running(obs: Observed, workers: list[dict[str, Any]], nodes: int) -> Verdict:
    if all(_phase(p) == "Succeeded" for p in workers):
        return Verdict(Phase.RUNNING, Reason.COMPLETING, "every worker finished; waiting for the Job to complete")
    labeling = obs.sample.labeling() if obs.sample else None
    if labeling:
        return Verdict(
            Phase.LABELING,
            Reason.LABELING,
            f"captioning images before training on {nodes} workers: {labeling[0]} of {labeling[1]} done",
        )
    return Verdict(Phase.RUNNING, Reason.TRAINING, shorten(f"training on {nodes} workers: " + _names(workers)))


def _group_failure(pods: list[dict[str, Any]], workers: list[dict[str, Any] | None]) -> tuple[int, PodOutcome] | None:
    """The newest failure among the workers that are not running: a failed pod, or the failed predecessor
    of a replacement still starting. None when no worker is held back by a failure."""
    causes = []
    for index, pod in enumerate(workers):
        if pod is None or _running(pod):
            continue
        failed = [p for p in pods if completion_index(p) == index and _phase(p) == "Failed"]
        if failed:
            causes.append((pod_order(failed[-1]), index, failed[-1]))
    if not causes:
        return None
    _, index, pod = max(causes, key=lambda c: c[0])
    return index, pod_outcome(pod)


def newest_by_index(pods: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The newest pod of each worker index (a replacement is newer than the pod it replaces)."""
    latest: dict[int, dict[str, Any]] = {}
    for pod in sorted(pods, key=pod_order):
        latest[completion_index(pod)] = pod
    return latest


def _unschedulable(pod: dict[str, Any]) -> bool:
    return not pod_finished(pod) and (waiting_reason(pod) or ("",))[0] == Reason.UNSCHEDULABLE


def _running(pod: dict[str, Any]) -> bool:
    return not pod_finished(pod) and trainer_running(pod)


def _phase(pod: dict[str, Any]) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def _name(pod: dict[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("name", "?")


def _names(pods: Iterable[dict[str, Any]]) -> str:
    return ", ".join(_name(p) for p in pods)


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
                if group_size(spec) > 1:
                    text = f"worker {completion_index(pod)} (pod {_name(pod)}): {outcome.message}"
                    return Verdict(Phase.FAILED, outcome.reason, shorten(text))
                return Verdict(Phase.FAILED, outcome.reason, outcome.message)
        return Verdict(Phase.FAILED, Reason.JOB_FAILED, shorten(condition.get("message")))
    if why == "BackoffLimitExceeded":
        limit = spec.get("backoffLimit", 3)  # 3: the CRD's default
        text = f"the trainer failed {limit + 1} time(s) (backoffLimit {limit})"
        if finished:
            text += f"; last failure: {pod_outcome(finished[-1]).message}"
        return Verdict(Phase.FAILED, Reason.BACKOFF_LIMIT_EXCEEDED, shorten(text))
    if why in ("MaxFailedIndexesExceeded", "FailedIndexes"):  # a multi-node job: per-worker retries
        return _worker_backoff(finished, spec)
    if why == "DeadlineExceeded":
        return Verdict(
            Phase.FAILED,
            Reason.DEADLINE_EXCEEDED,
            f"the run was active longer than spec.activeDeadlineSeconds ({spec.get('activeDeadlineSeconds')} s)",
        )
    return Verdict(Phase.FAILED, Reason.JOB_FAILED, shorten(f"{why}: {condition.get('message', '')}"))


def _worker_backoff(finished: list[dict[str, Any]], spec: dict[str, Any]) -> Verdict:
    limit = spec.get("backoffLimit", 3)  # 3: the CRD's default
    failed = [p for p in finished if _phase(p) == "Failed" and pod_outcome(p).reason != Reason.EVICTED]
    if not failed:
        text = f"a worker failed more than backoffLimit {limit} time(s)"
    else:
        last = failed[-1]
        index = completion_index(last)
        text = (
            f"worker {index} failed {limit + 1} time(s) (backoffLimit {limit} per worker); "
            f"last failure: {pod_outcome(last).message}"
        )
    return Verdict(Phase.FAILED, Reason.BACKOFF_LIMIT_EXCEEDED, shorten(text))


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
    nodes = group_size(obs.spec)
    workers = worker_table(obs.pods, old.get("workers") or [], nodes)
    if workers:
        new["workers"] = workers
    _track_attempts(new, obs.pods)
    if nodes > 1 and workers:
        new["attempts"] = max(int(old.get("attempts") or 0), *(w["attempts"] for w in workers))
    if obs.job is not None and not new.get("startTime"):
        new["startTime"] = (obs.job.get("metadata") or {}).get("creationTimestamp") or stamp
    # progress, checkpoints and artifacts are the main worker's (global rank 0); a summary without a rank
    # comes from a single-process trainer, which is rank 0
    output = output_uri(obs.spec)
    summaries = [
        s for s in (exit_summary(p, output) for p in sorted(obs.pods, key=pod_order)) if s and s.get("rank", 0) == 0
    ]
    for summary in summaries:
        _apply_checkpoint(new, summary.get("lastCheckpoint"), stamp)
    if summaries:
        _apply_exit_progress(new, summaries[-1], stamp)
    if obs.sample is not None:
        _apply_sample(new, obs.sample, stamp, output)
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


def output_uri(spec: dict[str, Any]) -> str | None:
    """spec.output.uri: every artifact and checkpoint a trainer reports must lie under it."""
    uri = (spec.get("output") or {}).get("uri")
    return uri if isinstance(uri, str) and uri else None


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


def worker_table(pods: list[dict[str, Any]], old: list[dict[str, Any]], nodes: int) -> list[dict[str, Any]]:
    """status.workers: for each worker index the newest pod as last seen (an index whose pods are all gone
    keeps its last entry), with the pods it has had so far (`attempts`) and its newest failed pod once a
    replacement took over (`lastFailure`: a pod failed and replaced between two looks is still named)."""
    before = {w.get("index"): w for w in old if isinstance(w, dict)}
    latest = newest_by_index(pods)
    table = []
    for index in range(nodes):
        pod = latest.get(index)
        if pod is None:
            if index in before:
                table.append(before[index])
            continue
        mine = sorted((p for p in pods if completion_index(p) == index), key=pod_order)
        entry = worker_entry(pod, _worker_attempts(before.get(index), mine))
        failed = [p for p in mine if p is not pod and _phase(p) == "Failed"]
        last = _failure_of(failed[-1]) if failed else _replaced_failure(before.get(index), entry)
        if last:
            entry["lastFailure"] = last
        table.append(entry)
    return table


def _failure_of(pod: dict[str, Any]) -> dict[str, Any]:
    outcome = pod_outcome(pod)
    failure = {"pod": _name(pod), "reason": outcome.reason, "message": outcome.message}
    node = (pod.get("spec") or {}).get("nodeName")
    return {**failure, "node": node} if node else failure


def _replaced_failure(before: dict[str, Any] | None, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The failure to keep naming when the failed pod itself is gone: the one recorded before, or the
    recorded pod itself when it was seen failed and a replacement now stands in its place."""
    if not before:
        return None
    if before.get("phase") == "Failed" and before.get("pod") != entry["pod"]:
        failure = {k: before[k] for k in ("pod", "node", "reason", "message") if before.get(k)}
        return failure
    return before.get("lastFailure")


def _worker_attempts(before: dict[str, Any] | None, pods: list[dict[str, Any]]) -> int:
    """Pods this worker index has had: the count recorded before, plus the pods newer than the one recorded."""
    if not before:
        return len(pods)
    mark = (before.get("creationTimestamp") or "", before.get("pod") or "")
    fresh = [p for p in pods if pod_order(p) > mark]
    return int(before.get("attempts") or 1) + len(fresh)


def worker_entry(pod: dict[str, Any], attempts: int) -> dict[str, Any]:
    """One row of status.workers: which pod is worker `index`, where it runs, how it is, why it failed."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    phase = _phase(pod) if _phase(pod) in ("Pending", "Running", "Succeeded", "Failed") else "Pending"
    ready = pod_condition(pod, "Ready") or {}
    entry: dict[str, Any] = {
        "index": completion_index(pod),
        "pod": meta.get("name", ""),
        "phase": phase,
        "ready": ready.get("status") == "True" and phase == "Running",
        "attempts": attempts,
    }
    for key, value in (("creationTimestamp", meta.get("creationTimestamp")), ("node", spec.get("nodeName"))):
        if value:
            entry[key] = value
    why = None
    if phase == "Failed":
        outcome = pod_outcome(pod)
        why = (outcome.reason, outcome.message)
    elif phase == "Pending":
        why = waiting_reason(pod)
    if why:
        entry["reason"], entry["message"] = why
    return entry


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
    new["lastCheckpoint"] = {"step": ckpt["step"], "uri": str(ckpt.get("uri") or ""), "time": stamp}


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


def _apply_sample(new: dict[str, Any], sample: ProgressSample, stamp: str, output: str | None) -> None:
    if not sample.total_steps:  # the trainer serves metrics before its setup knows the run's length
        return
    progress = sample.as_status()
    old = dict(new.get("progress") or {})
    old.pop("updatedAt", None)
    if progress and progress != old:
        new["progress"] = {**progress, "updatedAt": stamp}
    foreign = sample.checkpoint_uri is not None and not under(sample.checkpoint_uri, output)
    if sample.checkpoint_step is not None and not foreign:  # a checkpoint elsewhere is none of this job's
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


@dataclass(frozen=True)
class GroupPlan:
    """Whether the training Job should be suspended, the new status.scheduling (None: unchanged), and in how
    many seconds the group's next deadline falls (a release or a retry; None: none)."""

    suspend: bool
    scheduling: dict[str, Any] | None = None
    recheck: float | None = None


def plan_group(obs: Observed, now: datetime, settings: Settings) -> GroupPlan:
    """Gang scheduling for a multi-node job, on the Job's own `suspend` (Kubernetes 1.34's scheduler places
    pods one at a time): when some workers stay unschedulable while others hold their nodes for longer than
    settings.group_scheduling_timeout, suspend the Job (the Job controller deletes every pod: the group holds
    nothing) and resume it at `retryAt`, after group_retry_seconds doubled at each release, at most
    group_retry_max_seconds. The user's spec.suspend always wins. Single-node jobs: spec.suspend as is."""
    wanted = bool(obs.spec.get("suspend"))
    scheduling = dict((obs.status or {}).get("scheduling") or {})
    if group_size(obs.spec) == 1 or obs.job is None:
        return GroupPlan(wanted)
    if wanted or (scheduling.get("retryAt") and now >= (parse_time(scheduling["retryAt"]) or now)):
        return GroupPlan(wanted, _without_retry(scheduling))
    if scheduling.get("retryAt"):
        return GroupPlan(True, recheck=_seconds_until(scheduling["retryAt"], now))
    if job_condition(obs.job, "Complete") or job_condition(obs.job, "Failed"):
        return GroupPlan(False)
    stuck, left = _stuck_group(obs.pods, group_size(obs.spec), now, settings.group_scheduling_timeout)
    if stuck is None:
        return GroupPlan(False, recheck=left)
    releases = int(scheduling.get("releases") or 0) + 1
    delay = min(settings.group_retry_seconds * 2 ** (releases - 1), settings.group_retry_max_seconds)
    retry = rfc3339(now + timedelta(seconds=delay))
    return GroupPlan(True, {"releases": releases, "retryAt": retry, "message": stuck}, recheck=delay)


def _seconds_until(stamp: str, now: datetime) -> float:
    moment = parse_time(stamp)
    return max((moment - now).total_seconds(), 0.0) if moment else 0.0


def _without_retry(scheduling: dict[str, Any]) -> dict[str, Any] | None:
    if "retryAt" not in scheduling:
        return None
    return {k: v for k, v in scheduling.items() if k != "retryAt"}


def _stuck_group(
    pods: list[dict[str, Any]], nodes: int, now: datetime, timeout: float
) -> tuple[str | None, float | None]:
    """(why the group must be released, None), when some of its newest pods have been unschedulable for
    `timeout` seconds while others are bound to nodes (and hold their GPUs) waiting for them; else (None,
    seconds until that happens, or None when the group is not in that state)."""
    live = [p for p in newest_by_index(pods).values() if not pod_finished(p)]
    waiting = [p for p in live if _unschedulable(p)]
    holding = [p for p in live if (p.get("spec") or {}).get("nodeName")]
    if not waiting or not holding:
        return None, None
    since = min(_unschedulable_since(p) or now for p in waiting)
    elapsed = (now - since).total_seconds()
    if elapsed < timeout:
        return None, timeout - elapsed
    why = (waiting_reason(waiting[0]) or ("", ""))[1]
    text = (
        f"{len(waiting)} of {nodes} workers could not be scheduled for {int(timeout)} s ({why}) "
        f"while {len(holding)} held their nodes"
    )
    return shorten(text), None


def _unschedulable_since(pod: dict[str, Any]) -> datetime | None:
    condition = pod_condition(pod, "PodScheduled") or {}
    meta = pod.get("metadata") or {}
    return parse_time(condition.get("lastTransitionTime")) or parse_time(meta.get("creationTimestamp"))


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
