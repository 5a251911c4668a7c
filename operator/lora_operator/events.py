"""Kubernetes Events about a job: which status changes deserve one, and the core/v1 Event body to post."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .names import API_VERSION, KIND
from .reasons import WARNING_REASONS, Reason, shorten
from .status import Phase, rfc3339

# Kubernetes' Event validation limits: a message (note) of 1024 characters, a reportingInstance of 128;
# transitions() keeps its messages a little below the first.
EVENT_MESSAGE_LIMIT = 1024
TRANSITION_MESSAGE_LIMIT = 1000
REPORTING_INSTANCE_LIMIT = 128


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
        events.append(Transition("Warning" if warning else "Normal", reason, shorten(text, TRANSITION_MESSAGE_LIMIT)))
    if (new.get("attempts") or 0) > (old.get("attempts") or 0) and new.get("currentPod"):
        events.append(Transition("Normal", "AttemptStarted", _attempt_text(new)))
    events += worker_failures(old, new)
    old_ckpt = (old.get("lastCheckpoint") or {}).get("step")
    new_ckpt = (new.get("lastCheckpoint") or {}).get("step")
    if new_ckpt is not None and new_ckpt != old_ckpt:
        events.append(
            Transition(
                "Normal",
                "Checkpoint",
                f"checkpoint at step {new_ckpt}: {(new.get('lastCheckpoint') or {}).get('uri', '')}",
            )
        )
    return events


def _attempt_text(status: dict[str, Any]) -> str:
    workers = status.get("workers") or []
    if len(workers) > 1:
        pods = ", ".join(w["pod"] for w in workers if w.get("attempts") == status["attempts"])
        return f"attempt {status['attempts']}: worker pods {pods}"
    return f"attempt {status['attempts']}: trainer pod {status['currentPod']['name']}"


def worker_failures(old: dict[str, Any], new: dict[str, Any]) -> list[Transition]:
    """A Warning naming each worker of a multi-node job that newly failed while the job goes on (its
    replacement rejoins the group); not while the job is suspended (its pods were stopped) or has failed (the
    Failed event names the worker)."""
    workers = new.get("workers") or []
    if len(workers) < 2 or new.get("phase") not in (Phase.PENDING.value, Phase.RUNNING.value):
        return []
    if new.get("reason") in (Reason.SUSPENDING, Reason.WORKERS_UNSCHEDULABLE):
        return []
    named = {pod for w in old.get("workers") or [] for pod in _failed_pods(w)}
    events = []
    for worker in workers:
        for pod, failure in _failed_pods(worker).items():
            if pod in named:
                continue
            where = f" on node {failure['node']}" if failure.get("node") else ""
            text = f"worker {worker['index']} (pod {pod}{where}) failed: {failure.get('reason', '')}: "
            text += failure.get("message", "")
            events.append(Transition("Warning", Reason.WORKER_FAILED, shorten(text, TRANSITION_MESSAGE_LIMIT)))
    return events


def _failed_pods(worker: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The failed pods a status.workers entry names: its own pod when Failed, and its lastFailure."""
    failed = {}
    if worker.get("phase") == "Failed" and worker.get("pod"):
        failed[worker["pod"]] = worker
    last = worker.get("lastFailure") or {}
    if last.get("pod"):
        failed.setdefault(last["pod"], last)
    return failed


def build_event(job: dict[str, Any], event: Transition, now: datetime, instance: str) -> dict[str, Any]:
    """A core/v1 Event about a LoRATrainingJob (what `kubectl describe ltj` and `kubectl get events` show)."""
    meta = job["metadata"]
    stamp = rfc3339(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": job.get("apiVersion") or API_VERSION,
            "kind": job.get("kind") or KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:EVENT_MESSAGE_LIMIT],
        "count": 1,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "source": {"component": "lora-operator"},
        "reportingComponent": "lora-operator",
        "reportingInstance": instance[:REPORTING_INSTANCE_LIMIT],
    }
