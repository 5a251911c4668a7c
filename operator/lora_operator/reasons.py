"""The words of a job's status: Reason constants, the trainer exit code tables and the message length limit."""

from __future__ import annotations


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
    # a multi-node job whose workers could not all be scheduled: every worker released until a retry
    WORKERS_UNSCHEDULABLE = "WorkersUnschedulable"
    CHILD_CONFLICT = "ChildConflict"  # a child's name is taken by an object someone else controls
    CHILD_FORBIDDEN = "ChildForbidden"  # the API server forbade a child (403: quota, policy); retried
    # Labeling / Running / Suspended
    LABELING = "Labeling"
    TRAINING = "Training"
    COMPLETING = "Completing"  # the trainer exited 0; the Job controller has not marked it Complete yet
    SUSPENDING = "Suspending"
    SUSPENDED = "Suspended"
    # Succeeded
    COMPLETED = "TrainingSucceeded"
    # Failed, permanent trainer exits (docs/architecture.md, exit codes)
    CONFIG_INVALID = "ConfigInvalid"
    DATASET_INVALID = "DatasetInvalid"
    MODEL_INVALID = "ModelInvalid"
    TRAINING_DIVERGED = "TrainingDiverged"
    STORAGE_INVALID = "StorageInvalid"
    # Failed before any pod: another live job writes to an overlapping spec.output.uri (outputs.py)
    OUTPUT_IN_USE = "OutputInUse"
    # Failed: the API server refused a child (Job, ConfigMap, Service) as invalid (400/422); its message says why
    CHILD_REJECTED = "ChildRejected"
    # Failed, by the Job controller
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    JOB_FAILED = "JobFailed"  # any other Job failure reason
    # Retried failures, in messages of Restarting
    CRASHED = "Crashed"
    INTERRUPTED = "Interrupted"
    # Event (not a phase reason): a worker of a multi-node job failed and is being replaced
    WORKER_FAILED = "WorkerFailed"
    # Events: what a trainer pod sent back broke the contract and was dropped (termination.py, progress.py)
    TERMINATION_MESSAGE_INVALID = "TerminationMessageInvalid"
    METRICS_REFUSED = "MetricsRefused"


# Trainer exit codes (lora_trainer.errors.ExitCode) -> reasons. The permanent ones fail the Job at once
# through its podFailurePolicy; builders.py builds that rule from the same table.
PERMANENT_EXIT_REASONS: dict[int, str] = {
    2: Reason.CONFIG_INVALID,
    3: Reason.DATASET_INVALID,
    4: Reason.MODEL_INVALID,
    5: Reason.TRAINING_DIVERGED,
    6: Reason.STORAGE_INVALID,
}
RETRIED_EXIT_REASONS: dict[int, str] = {
    1: "Crashed",
    7: "OutputFailed",
    8: "StorageUnavailable",
    143: "Interrupted",
    137: "Killed",
}

# Reasons whose Event is a Warning (besides every Failed phase).
WARNING_REASONS = frozenset(
    {
        Reason.UNSCHEDULABLE,
        Reason.WORKERS_UNSCHEDULABLE,
        Reason.IMAGE_PULL_FAILED,
        Reason.CONTAINER_CONFIG_ERROR,
        Reason.CHILD_CONFLICT,
        Reason.CHILD_FORBIDDEN,
        Reason.RESTARTING,
        Reason.EVICTED,
        Reason.OOM_KILLED,
        *PERMANENT_EXIT_REASONS.values(),
        Reason.BACKOFF_LIMIT_EXCEEDED,
        Reason.DEADLINE_EXCEEDED,
        Reason.JOB_FAILED,
    }
)

# Status and condition messages: room for the trainer's error line with its context (its termination message
# holds at most 4 KiB), short enough that `kubectl describe` stays readable and status small.
MAX_MESSAGE = 2000


def shorten(text: str | None, limit: int = MAX_MESSAGE) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
