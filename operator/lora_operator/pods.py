"""Reading trainer pods and the batch/v1 Job: container states, conditions, order, and why a pod ended or waits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .names import COMPLETION_INDEX_ANNOTATION, CONTAINER
from .reasons import PERMANENT_EXIT_REASONS, RETRIED_EXIT_REASONS, Reason, shorten
from .termination import read_message


def group_size(spec: dict[str, Any]) -> int:
    """How many nodes (worker pods) the job trains on: spec.resources.nodes, 1 when unset."""
    return max(int((spec.get("resources") or {}).get("nodes") or 1), 1)


def completion_index(pod: dict[str, Any]) -> int:
    """The worker index of a pod of an Indexed Job (the Job controller's annotation, else its label); 0 for
    the one pod of a single-node job."""
    meta = pod.get("metadata") or {}
    for source in (meta.get("annotations") or {}, meta.get("labels") or {}):
        value = source.get(COMPLETION_INDEX_ANNOTATION)
        if value is not None and str(value).isdigit():
            return int(value)
    return 0


def termination_summary(message: str | None, output_uri: str | None = None) -> dict[str, Any] | None:
    """The trainer's one-line JSON exit summary, checked (termination.py); None when the message is not one."""
    return read_message(message, output_uri).summary


def trainer_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == CONTAINER), statuses[0] if statuses else {})


def terminated_state(pod: dict[str, Any]) -> dict[str, Any] | None:
    status = trainer_status(pod)
    return (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get("terminated")


def exit_summary(pod: dict[str, Any], output_uri: str | None = None) -> dict[str, Any] | None:
    """The exit summary in the trainer's termination message, once it has terminated; its URIs must lie
    under output_uri (spec.output.uri)."""
    term = terminated_state(pod)
    return termination_summary((term or {}).get("message"), output_uri)


def exit_summary_problems(pod: dict[str, Any], output_uri: str | None) -> list[str]:
    """What in the pod's termination message broke the contract and was dropped (for a Warning Event)."""
    term = terminated_state(pod) or {}
    return read_message(term.get("message"), output_uri).problems


def trainer_running(pod: dict[str, Any]) -> bool:
    return "running" in (trainer_status(pod).get("state") or {})


def pod_condition(pod: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == ctype), None)


def job_condition(job: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    if not job:
        return None
    return next(
        (
            c
            for c in (job.get("status") or {}).get("conditions") or []
            if c.get("type") == ctype and c.get("status") == "True"
        ),
        None,
    )


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
        # evicted or preempted: the Job's podFailurePolicy does not count it against backoffLimit
        why = status.get("message") or (disruption or {}).get("message") or (disruption or {}).get("reason") or ""
        return PodOutcome(Reason.EVICTED, shorten(f"pod {name} was evicted: {why}".rstrip(": ")), code)
    if status.get("reason") == "DeadlineExceeded":
        return PodOutcome(Reason.DEADLINE_EXCEEDED, shorten(f"pod {name}: {status.get('message', '')}"), code)
    if term.get("reason") == "OOMKilled":
        return PodOutcome(
            Reason.OOM_KILLED,
            shorten(
                f"pod {name}: the trainer ran out of memory (OOMKilled, exit code {code}); raise spec.resources.memory"
            ),
            code,
        )
    if code in PERMANENT_EXIT_REASONS:
        reason = PERMANENT_EXIT_REASONS[code]
        return PodOutcome(reason, shorten(said or f"the trainer exited with code {code} ({reason})"), code)
    if code is None:
        return PodOutcome(Reason.CRASHED, f"pod {name} ended without an exit code", None)
    kind = RETRIED_EXIT_REASONS.get(code, "Crashed")
    text = f"pod {name}: the trainer exited with code {code} ({kind})"
    if said:
        text += f": {said}"
    return PodOutcome(Reason.RESTARTING, shorten(text), code)


def waiting_reason(pod: dict[str, Any]) -> tuple[str, str] | None:
    """Why a pod is not running yet, as (reason, message) for the Pending condition."""
    scheduled = pod_condition(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return Reason.UNSCHEDULABLE, shorten(scheduled.get("message") or "no node fits the trainer pod")
    waiting = (trainer_status(pod).get("state") or {}).get("waiting") or {}
    why = waiting.get("reason")
    if why in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"):
        image = next(
            (c.get("image") for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == CONTAINER), ""
        )
        return Reason.IMAGE_PULL_FAILED, shorten(f"{why}: {waiting.get('message') or image}")
    if why in ("CreateContainerConfigError", "CreateContainerError", "RunContainerError"):
        return Reason.CONTAINER_CONFIG_ERROR, shorten(f"{why}: {waiting.get('message', '')}")
    return None
