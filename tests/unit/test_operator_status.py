"""The status state machine, table-driven: observed Job + pods + progress -> phase, reason, conditions; and the
pod readers (pods.py) and Events (events.py) it is built with."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from lora_operator.events import transitions
from lora_operator.pods import pod_outcome, termination_summary
from lora_operator.progress import ProgressSample
from lora_operator.reasons import Reason
from lora_operator.status import CONDITION_TYPES, Observed, Phase, compute_status, status_patch

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SPEC = {"backoffLimit": 2, "activeDeadlineSeconds": 600}
SHA = "ab" * 32


def job(suspend=False, conditions=(), completion=None):
    status = {"conditions": [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions]}
    if completion:
        status["completionTime"] = completion
    return {
        "metadata": {"name": "cats-train", "uid": "j1", "creationTimestamp": "2026-01-02T03:00:00Z"},
        "spec": {"suspend": suspend},
        "status": status,
    }


def pod(
    name="cats-train-aaaaa",
    created="2026-01-02T03:00:01Z",
    phase="Running",
    state=None,
    conditions=(),
    reason=None,
    message=None,
    ip="10.0.0.5",
):
    status = {
        "phase": phase,
        "podIP": ip,
        "conditions": list(conditions),
        "containerStatuses": [{"name": "trainer", "state": state or {"running": {}}}],
    }
    if reason:
        status["reason"], status["message"] = reason, message
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"containers": [{"name": "trainer", "image": "trainer:1"}]},
        "status": status,
    }


def exited(code, message="", reason="Error", **kwargs):
    phase = "Succeeded" if code == 0 else "Failed"
    return pod(phase=phase, state={"terminated": {"exitCode": code, "reason": reason, "message": message}}, **kwargs)


def summary(status, code, **fields):
    return json.dumps({"status": status, "exitCode": code, **fields})


def waiting(reason, message=""):
    return pod(phase="Pending", state={"waiting": {"reason": reason, "message": message}}, ip=None)


UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
}
DISRUPTED = {
    "type": "DisruptionTarget",
    "status": "True",
    "reason": "EvictionByEvictionAPI",
    "message": "Eviction API: evicting",
}

CASES = [
    # (id, job, pods, phase, reason, message fragment)
    ("no-job-yet", None, [], Phase.PENDING, Reason.CREATED, "creating"),
    ("no-pod-yet", job(), [], Phase.PENDING, Reason.CREATED, "Job controller"),
    ("pod-starting", job(), [waiting("ContainerCreating")], Phase.PENDING, Reason.POD_PENDING, "starting"),
    (
        "unschedulable",
        job(),
        [pod(phase="Pending", state={"waiting": {"reason": "ContainerCreating"}}, conditions=[UNSCHEDULABLE])],
        Phase.PENDING,
        Reason.UNSCHEDULABLE,
        "Insufficient nvidia.com/gpu",
    ),
    (
        "image-pull",
        job(),
        [waiting("ImagePullBackOff", 'Back-off pulling image "nope:1"')],
        Phase.PENDING,
        Reason.IMAGE_PULL_FAILED,
        "nope:1",
    ),
    (
        "err-image-pull",
        job(),
        [waiting("ErrImagePull", "not found")],
        Phase.PENDING,
        Reason.IMAGE_PULL_FAILED,
        "not found",
    ),
    (
        "missing-secret",
        job(),
        [waiting("CreateContainerConfigError", 'secret "s3" not found')],
        Phase.PENDING,
        Reason.CONTAINER_CONFIG_ERROR,
        'secret "s3" not found',
    ),
    ("running", job(), [pod()], Phase.RUNNING, Reason.TRAINING, "cats-train-aaaaa"),
    (
        "trainer-done-job-not-yet",
        job(),
        [exited(0, summary("succeeded", 0))],
        Phase.RUNNING,
        Reason.COMPLETING,
        "finished",
    ),
    (
        "succeeded",
        job(
            conditions=[("SuccessCriteriaMet", "CompletionsReached", ""), ("Complete", "CompletionsReached", "")],
            completion="2026-01-02T03:09:00Z",
        ),
        [exited(0, summary("succeeded", 0))],
        Phase.SUCCEEDED,
        Reason.COMPLETED,
        "finished",
    ),
    (
        "dataset-invalid",
        job(conditions=[("Failed", "PodFailurePolicy", "Container trainer ... exit code 3")]),
        [
            exited(
                3, summary("failed", 3, error="s3://data/cats holds no images", reason="DatasetInvalid", permanent=True)
            )
        ],
        Phase.FAILED,
        Reason.DATASET_INVALID,
        "holds no images",
    ),
    (
        "config-invalid",
        job(conditions=[("Failed", "PodFailurePolicy", "exit code 2")]),
        [exited(2, summary("failed", 2, error="'lora_rank': must be >= 1"))],
        Phase.FAILED,
        Reason.CONFIG_INVALID,
        "lora_rank",
    ),
    (
        "storage-invalid-plain-log",
        job(conditions=[("Failed", "PodFailurePolicy", "exit code 6")]),
        [exited(6, "botocore: InvalidAccessKeyId")],
        Phase.FAILED,
        Reason.STORAGE_INVALID,
        "InvalidAccessKeyId",
    ),
    (
        "backoff-exceeded",
        job(conditions=[("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]),
        [
            exited(137, "", name="a", created="2026-01-02T03:00:01Z"),
            exited(137, "", name="b", created="2026-01-02T03:01:01Z"),
            exited(1, summary("failed", 1, error="RuntimeError: boom"), name="c", created="2026-01-02T03:02:01Z"),
        ],
        Phase.FAILED,
        Reason.BACKOFF_LIMIT_EXCEEDED,
        "boom",
    ),
    (
        "oom-then-backoff",
        job(conditions=[("Failed", "BackoffLimitExceeded", "")]),
        [exited(137, "", reason="OOMKilled")],
        Phase.FAILED,
        Reason.BACKOFF_LIMIT_EXCEEDED,
        "OOMKilled",
    ),
    (
        "deadline",
        job(conditions=[("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]),
        [],
        Phase.FAILED,
        Reason.DEADLINE_EXCEEDED,
        "activeDeadlineSeconds (600 s)",
    ),
    (
        "crashed-waiting-for-retry",
        job(),
        [exited(1, summary("failed", 1, error="CUDA error"))],
        Phase.PENDING,
        Reason.RESTARTING,
        "CUDA error",
    ),
    (
        "oom-waiting-for-retry",
        job(),
        [exited(137, "", reason="OOMKilled")],
        Phase.PENDING,
        Reason.OOM_KILLED,
        "out of memory",
    ),
    (
        "evicted-replacement-starting",
        job(),
        [
            exited(143, summary("interrupted", 143), conditions=[DISRUPTED], name="a"),
            waiting("ContainerCreating") | {"metadata": {"name": "b", "creationTimestamp": "2026-01-02T03:05:00Z"}},
        ],
        Phase.PENDING,
        Reason.EVICTED,
        "evicted",
    ),
    (
        "kubelet-evicted",
        job(),
        [
            exited(137, "", reason="Error")
            | {
                "status": {
                    "phase": "Failed",
                    "reason": "Evicted",
                    "message": "The node was low on resource: memory.",
                    "containerStatuses": [],
                }
            }
        ],
        Phase.PENDING,
        Reason.EVICTED,
        "low on resource",
    ),
    ("suspending", job(suspend=True), [pod()], Phase.RUNNING, Reason.SUSPENDING, "checkpoint"),
    ("suspended", job(suspend=True), [], Phase.SUSPENDED, Reason.SUSPENDED, "spec.suspend"),
    (
        "suspended-pod-gone-but-listed",
        job(suspend=True),
        [exited(143, summary("interrupted", 143))],
        Phase.SUSPENDED,
        Reason.SUSPENDED,
        "resume",
    ),
]


@pytest.mark.parametrize("name,the_job,pods,phase,reason,fragment", CASES, ids=[c[0] for c in CASES])
def test_transitions(name, the_job, pods, phase, reason, fragment):
    status = compute_status(Observed(3, SPEC, {}, the_job, pods), T0)
    assert (status["phase"], status["reason"]) == (phase.value, reason)
    assert fragment in status["message"]
    assert status["observedGeneration"] == 3
    conditions = {c["type"]: c for c in status["conditions"]}
    assert set(conditions) == set(CONDITION_TYPES)
    for ctype, condition in conditions.items():
        expected = (
            "True"
            if ctype
            == {"Running": "Running", "Succeeded": "Succeeded", "Failed": "Failed", "Suspended": "Suspended"}.get(
                phase.value
            )
            else "False"
        )
        assert condition["status"] == expected
        assert condition["reason"] == reason and condition["observedGeneration"] == 3


def test_config_error_fails_before_any_pod():
    status = compute_status(Observed(1, SPEC, {}, config_error="spec is invalid: 'lr_warmup_steps'"), T0)
    assert (status["phase"], status["reason"]) == ("Failed", Reason.CONFIG_INVALID)
    assert status["completionTime"] == "2026-01-02T03:04:05Z"


def test_phase_helpers():
    assert Phase.SUCCEEDED.is_terminal() and Phase.FAILED.is_terminal()
    assert not any(p.is_terminal() for p in (Phase.PENDING, Phase.RUNNING, Phase.SUSPENDED, Phase.LABELING))
    assert Phase.parse("nonsense") is Phase.PENDING and Phase.parse(None) is Phase.PENDING


def test_last_transition_time_moves_only_when_a_condition_flips():
    first = compute_status(Observed(1, SPEC, {}, job(), [waiting("ContainerCreating")]), T0)
    later = T0 + timedelta(minutes=1)
    second = compute_status(Observed(1, SPEC, first, job(), [pod()]), later)
    before = {c["type"]: c["lastTransitionTime"] for c in first["conditions"]}
    after = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert after["Running"] == "2026-01-02T03:05:05Z"  # False -> True
    assert after["Failed"] == before["Failed"] == "2026-01-02T03:04:05Z"


def test_nothing_changes_means_no_patch():
    sample = ProgressSample(step=5, total_steps=20, loss=0.5, learning_rate=1e-3)
    first = compute_status(Observed(1, SPEC, {}, job(), [pod()], sample), T0)
    again = compute_status(Observed(1, SPEC, first, job(), [pod()], sample), T0 + timedelta(seconds=30))
    assert again == first
    assert status_patch(first, again) == {}


def test_progress_is_stamped_only_when_it_moves():
    s1 = ProgressSample(
        step=5,
        total_steps=20,
        loss=0.51234567,
        learning_rate=1e-3,
        step_seconds_sum=10.0,
        step_seconds_count=5,
        samples_total=10,
    )
    first = compute_status(Observed(1, SPEC, {}, job(), [pod()], s1), T0)
    assert first["progress"] == {
        "step": 5,
        "totalSteps": 20,
        "loss": 0.51235,
        "learningRate": 0.001,
        "samplesPerSecond": 1.0,
        "eta": "30s",
        "updatedAt": "2026-01-02T03:04:05Z",
    }
    s2 = ProgressSample(step=6, total_steps=20, loss=0.5, learning_rate=1e-3)
    second = compute_status(Observed(1, SPEC, first, job(), [pod()], s2), T0 + timedelta(seconds=7))
    assert second["progress"]["step"] == 6 and second["progress"]["updatedAt"] == "2026-01-02T03:04:12Z"
    # the pod stops being scraped (between attempts): progress stays as last seen
    third = compute_status(Observed(1, SPEC, second, job(), [exited(1, "")], None), T0 + timedelta(seconds=9))
    assert third["progress"] == second["progress"]


def test_success_records_artifacts_final_progress_and_last_checkpoint():
    done = summary(
        "succeeded",
        0,
        step=20,
        totalSteps=20,
        loss=0.0931,
        artifacts=[
            {
                "uri": "s3://loras/cats/pytorch_lora_weights.safetensors",
                "format": "diffusers",
                "sha256": SHA,
                "step": 20,
            },
            {"uri": "s3://loras/cats/cats.kohya.safetensors", "format": "kohya", "sha256": "CD" * 32, "step": 20},
        ],
        lastCheckpoint={"step": 20, "uri": "s3://loras/cats/checkpoints/state_step_20"},
    )
    the_job = job(conditions=[("Complete", "CompletionsReached", "")], completion="2026-01-02T03:09:00Z")
    status = compute_status(
        Observed(1, SPEC, {"progress": {"step": 18, "totalSteps": 20}}, the_job, [exited(0, done)]), T0
    )
    assert status["artifacts"] == [
        {"uri": "s3://loras/cats/pytorch_lora_weights.safetensors", "format": "diffusers", "sha256": SHA, "step": 20},
        {"uri": "s3://loras/cats/cats.kohya.safetensors", "format": "kohya", "sha256": "cd" * 32, "step": 20},
    ]
    assert (
        status["progress"]["step"] == 20 and status["progress"]["loss"] == 0.0931 and status["progress"]["eta"] == "0s"
    )
    assert status["lastCheckpoint"]["step"] == 20
    assert status["completionTime"] == "2026-01-02T03:09:00Z"


def test_interrupted_pods_move_the_last_checkpoint_forward_only():
    old = {"lastCheckpoint": {"step": 30, "uri": "s3://x/checkpoints/state_step_30", "time": "2026-01-02T03:00:00Z"}}
    stale = exited(
        143, summary("interrupted", 143, lastCheckpoint={"step": 20, "uri": "s3://x/checkpoints/state_step_20"})
    )
    assert compute_status(Observed(1, SPEC, old, job(), [stale]), T0)["lastCheckpoint"]["step"] == 30
    newer = exited(
        143, summary("interrupted", 143, lastCheckpoint={"step": 40, "uri": "s3://x/checkpoints/state_step_40"})
    )
    assert compute_status(Observed(1, SPEC, old, job(), [newer]), T0)["lastCheckpoint"] == {
        "step": 40,
        "uri": "s3://x/checkpoints/state_step_40",
        "time": "2026-01-02T03:04:05Z",
    }


def test_attempts_count_every_pod_once_even_after_it_is_gone():
    a = pod(name="a", created="2026-01-02T03:00:01Z")
    s1 = compute_status(Observed(1, SPEC, {}, job(), [a]), T0)
    assert s1["attempts"] == 1 and s1["currentPod"]["name"] == "a"
    assert compute_status(Observed(1, SPEC, s1, job(), [a]), T0)["attempts"] == 1
    b = pod(name="b", created="2026-01-02T03:02:00Z")
    s2 = compute_status(Observed(1, SPEC, s1, job(), [b]), T0)  # a was evicted and deleted
    assert s2["attempts"] == 2 and s2["currentPod"]["name"] == "b"
    c = pod(name="c", created="2026-01-02T03:03:00Z")
    d = pod(name="d", created="2026-01-02T03:04:00Z")
    assert compute_status(Observed(1, SPEC, s2, job(), [b, c, d]), T0)["attempts"] == 4


def test_start_time_comes_from_the_job():
    assert compute_status(Observed(1, SPEC, {}, job(), []), T0)["startTime"] == "2026-01-02T03:00:00Z"
    assert "startTime" not in compute_status(Observed(1, SPEC, {}, None, []), T0)


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"status": "failed", "exitCode": 3}', {"status": "failed", "exitCode": 3}),
        ('log line\n{"status": "succeeded", "exitCode": 0}\n', {"status": "succeeded", "exitCode": 0}),
        ("Traceback (most recent call last):\n  ...", None),
        ('{"not": "a summary"}', None),
        ("", None),
    ],
)
def test_termination_summary(text, expected):
    assert termination_summary(text) == expected


def test_pod_outcome_prefers_the_trainers_own_words():
    outcome = pod_outcome(
        exited(8, summary("failed", 8, error="S3 unreachable after 300 s", reason="StorageUnavailable"))
    )
    assert outcome.reason == Reason.RESTARTING and "S3 unreachable" in outcome.message and "code 8" in outcome.message
    assert pod_outcome(exited(137, "")).message.endswith("(Killed)")


def test_events_name_each_transition():
    pending = compute_status(Observed(1, SPEC, {}, job(), [waiting("ContainerCreating")]), T0)
    running = compute_status(Observed(1, SPEC, pending, job(), [pod()]), T0)
    events = transitions(pending, running)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Training")]
    failed = compute_status(Observed(1, SPEC, running, job(conditions=[("Failed", "DeadlineExceeded", "")]), []), T0)
    assert [(e.type, e.reason) for e in transitions(running, failed)] == [("Warning", "DeadlineExceeded")]
    first = transitions({}, pending)
    assert ("Normal", "AttemptStarted") in [(e.type, e.reason) for e in first]
    assert transitions(running, running) == []


def test_status_patch_is_a_merge_patch():
    assert status_patch({"a": 1, "b": 2}, {"a": 1, "c": 3}) == {"b": None, "c": 3}
    old = {"progress": {"step": 5, "eta": "1m", "loss": 0.5}, "conditions": [{"type": "Running"}]}
    new = {"progress": {"step": 6, "loss": 0.5}, "conditions": [{"type": "Running"}, {"type": "Failed"}]}
    assert status_patch(old, new) == {
        "progress": {"step": 6, "eta": None},
        "conditions": [{"type": "Running"}, {"type": "Failed"}],
    }


def test_a_trainer_captioning_its_images_is_labeling_then_running():
    captioning = ProgressSample(step=0, total_steps=0, labeling_images=30, labeled_images=8)
    status = compute_status(Observed(1, SPEC, {}, job(), [pod()], captioning), T0)
    assert (status["phase"], status["reason"]) == ("Labeling", Reason.LABELING)
    assert "8 of 30 done" in status["message"] and "progress" not in status
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Running": "True", "Succeeded": "False", "Failed": "False", "Suspended": "False"}
    captioned = ProgressSample(step=0, total_steps=40, labeling_images=30, labeled_images=30)
    later = compute_status(Observed(1, SPEC, status, job(), [pod()], captioned), T0 + timedelta(seconds=5))
    assert (later["phase"], later["reason"]) == ("Running", Reason.TRAINING)
    assert [e.reason for e in transitions(status, later)] == ["Training"]
    # the Running condition stays True from Labeling to Running: no flip, no new transition time
    assert {c["type"]: c["lastTransitionTime"] for c in later["conditions"]}["Running"] == "2026-01-02T03:04:05Z"


def test_a_trainer_still_in_setup_reports_no_progress():
    early = ProgressSample(step=0, total_steps=0, loss=0.0, learning_rate=0.0)
    status = compute_status(Observed(1, SPEC, {}, job(), [pod()], early), T0)
    assert "progress" not in status


def test_a_stopped_trainer_reports_its_last_step_and_no_eta():
    old = {"progress": {"step": 5, "totalSteps": 30, "loss": 0.9, "eta": "2m", "updatedAt": "2026-01-02T03:00:00Z"}}
    gone = exited(
        143,
        summary(
            "interrupted",
            143,
            step=6,
            totalSteps=30,
            loss=0.8,
            lastCheckpoint={"step": 6, "uri": "s3://x/checkpoints/state_step_6"},
        ),
    )
    status = compute_status(Observed(1, SPEC, old, job(suspend=True), [gone]), T0)
    assert status["phase"] == "Suspended"
    assert status["progress"] == {"step": 6, "totalSteps": 30, "loss": 0.8, "updatedAt": "2026-01-02T03:04:05Z"}
    assert status["lastCheckpoint"]["step"] == 6


# ---------------------------------------------------------------------------------------------
# multi-node jobs: one pod per worker index, status.workers, rank 0's summaries, gang release


GROUP = {"backoffLimit": 2, "resources": {"gpus": 2, "nodes": 2}}


def worker(index, name=None, created="2026-01-02T03:00:01Z", node="node-a", **kwargs):
    """A pod of the Indexed Job: worker `index` (annotation set by the Job controller), bound to `node`."""
    base = kwargs.pop("base", None) or pod(name=name or f"cats-train-{index}-aaaaa", created=created, **kwargs)
    base["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    if node:
        base["spec"]["nodeName"] = node
    return base


def unschedulable_worker(index, since="2026-01-02T03:00:02Z"):
    condition = dict(UNSCHEDULABLE, lastTransitionTime=since, message="0/2 nodes are available: 2 Insufficient memory.")
    return worker(
        index,
        node=None,
        base=pod(
            name=f"cats-train-{index}-bbbbb",
            phase="Pending",
            state={"waiting": {"reason": "ContainerCreating"}},
            conditions=[condition],
            ip=None,
        ),
    )


def exited_worker(index, code, message="", name=None, created="2026-01-02T03:00:01Z", node="node-a", **kwargs):
    pod_name = name or f"cats-train-{index}-aaaaa"
    return worker(index, node=node, base=exited(code, message, name=pod_name, created=created, **kwargs))


GROUP_CASES = [
    # (id, job, pods, phase, reason, message fragment)
    ("no-worker-yet", job(), [], Phase.PENDING, Reason.CREATED, "worker pods"),
    ("all-running", job(), [worker(0), worker(1, node="node-b")], Phase.RUNNING, Reason.TRAINING, "on 2 workers"),
    ("one-starting", job(), [worker(0)], Phase.PENDING, Reason.POD_PENDING, "1 of 2 workers running; worker(s) 1"),
    (
        "one-unschedulable",
        job(),
        [worker(0), unschedulable_worker(1)],
        Phase.PENDING,
        Reason.UNSCHEDULABLE,
        "1 of 2 workers cannot be scheduled: 0/2 nodes are available: 2 Insufficient memory.",
    ),
    (
        "image-pull-names-the-worker",
        job(),
        [worker(0), worker(1, base=waiting("ImagePullBackOff", "nope:1"))],
        Phase.PENDING,
        Reason.IMAGE_PULL_FAILED,
        "worker 1 (pod cats-train-aaaaa)",
    ),
    (
        "worker-crashed-replacement-starting",
        job(),
        [
            worker(0),
            exited_worker(1, 1, summary("failed", 1, error="RuntimeError: boom")),
            worker(1, name="cats-train-1-ccccc", created="2026-01-02T03:05:00Z", base=None, node="node-b")
            | {"status": {"phase": "Pending", "containerStatuses": [{"name": "trainer", "state": {"waiting": {}}}]}},
        ],
        Phase.PENDING,
        Reason.RESTARTING,
        "worker 1: pod cats-train-1-aaaaa: the trainer exited with code 1 (Crashed): RuntimeError: boom",
    ),
    (
        "worker-evicted",
        job(),
        [worker(0), exited_worker(1, 143, summary("interrupted", 143), conditions=[DISRUPTED])],
        Phase.PENDING,
        Reason.EVICTED,
        "worker 1",
    ),
    (
        "one-finished-one-still-writing",
        job(),
        [worker(0), exited_worker(1, 0, summary("succeeded", 0, rank=1, worldSize=4))],
        Phase.RUNNING,
        Reason.TRAINING,
        "on 2 workers",
    ),
    (
        "all-finished",
        job(),
        [exited_worker(0, 0, summary("succeeded", 0)), exited_worker(1, 0, summary("succeeded", 0, rank=2))],
        Phase.RUNNING,
        Reason.COMPLETING,
        "every worker finished",
    ),
    (
        "worker-out-of-retries",
        job(conditions=[("Failed", "MaxFailedIndexesExceeded", "Job has exceeded the specified maximal number")]),
        [worker(0), exited_worker(1, 1, summary("failed", 1, error="NCCL timeout"))],
        Phase.FAILED,
        Reason.BACKOFF_LIMIT_EXCEEDED,
        "worker 1 failed 3 time(s) (backoffLimit 2 per worker); last failure: pod cats-train-1-aaaaa",
    ),
    (
        "permanent-error-names-the-worker",
        job(conditions=[("Failed", "PodFailurePolicy", "exit code 3")]),
        [
            exited_worker(0, 143, summary("interrupted", 143)),
            exited_worker(1, 3, summary("failed", 3, error="no images", reason="DatasetInvalid", permanent=True)),
        ],
        Phase.FAILED,
        Reason.DATASET_INVALID,
        "worker 1 (pod cats-train-1-aaaaa): no images",
    ),
    ("user-suspended", job(suspend=True), [], Phase.SUSPENDED, Reason.SUSPENDED, "spec.suspend"),
]


@pytest.mark.parametrize("name,the_job,pods,phase,reason,fragment", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
def test_group_transitions(name, the_job, pods, phase, reason, fragment):
    status = compute_status(Observed(1, GROUP, {}, the_job, pods), T0)
    assert (status["phase"], status["reason"]) == (phase.value, reason), status["message"]
    assert fragment in status["message"]


def test_workers_lists_each_index_with_its_node_phase_and_failure():
    pods = [
        worker(0, node="node-a"),
        exited_worker(1, 1, summary("failed", 1, error="boom"), node="node-b"),
    ]
    pods[0]["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    status = compute_status(Observed(1, GROUP, {}, job(), pods), T0)
    first, second = status["workers"]
    assert first == {
        "index": 0,
        "pod": "cats-train-0-aaaaa",
        "creationTimestamp": "2026-01-02T03:00:01Z",
        "phase": "Running",
        "ready": True,
        "attempts": 1,
        "node": "node-a",
    }
    assert (second["index"], second["phase"], second["ready"], second["node"]) == (1, "Failed", False, "node-b")
    assert second["reason"] == Reason.RESTARTING and "boom" in second["message"]


def test_a_replaced_worker_counts_an_attempt_and_the_job_counts_the_busiest_worker():
    first = compute_status(Observed(1, GROUP, {}, job(), [worker(0), worker(1)]), T0)
    assert first["attempts"] == 1 and [w["attempts"] for w in first["workers"]] == [1, 1]
    # worker 1's pod failed and was deleted; its replacement starts
    replacement = worker(1, name="cats-train-1-zzzzz", created="2026-01-02T03:07:00Z")
    second = compute_status(Observed(1, GROUP, first, job(), [worker(0), replacement]), T0)
    assert [w["attempts"] for w in second["workers"]] == [1, 2] and second["attempts"] == 2
    assert second["workers"][1]["pod"] == "cats-train-1-zzzzz"
    # seen again: nothing more counted
    assert compute_status(Observed(1, GROUP, second, job(), [worker(0), replacement]), T0)["attempts"] == 2
    # the whole group restarted (released and resumed): each index one more pod, the job one more attempt
    again = [worker(i, name=f"cats-train-{i}-yyyyy", created="2026-01-02T03:09:00Z") for i in (0, 1)]
    third = compute_status(Observed(1, GROUP, second, job(), again), T0)
    assert [w["attempts"] for w in third["workers"]] == [2, 3] and third["attempts"] == 3


def test_a_worker_whose_pod_is_gone_keeps_its_last_entry():
    first = compute_status(Observed(1, GROUP, {}, job(), [worker(0), worker(1)]), T0)
    later = compute_status(Observed(1, GROUP, first, job(), [worker(0)]), T0)
    assert later["workers"][1] == first["workers"][1]


def test_progress_and_artifacts_come_from_rank_0_only():
    other = exited_worker(
        0, 0, summary("succeeded", 0, rank=2, worldSize=4, step=99, artifacts=[{"uri": "s3://x/wrong"}])
    )
    main = exited_worker(
        1,
        0,
        summary(
            "succeeded",
            0,
            rank=0,
            worldSize=4,
            step=20,
            totalSteps=20,
            loss=0.25,
            artifacts=[{"uri": "s3://loras/cats/pytorch_lora_weights.safetensors", "format": "diffusers"}],
            lastCheckpoint={"step": 20, "uri": "s3://loras/cats/checkpoints/state_step_20"},
        ),
        created="2026-01-02T03:00:00Z",
    )
    done = job(conditions=[("Complete", "CompletionsReached", "")], completion="2026-01-02T03:09:00Z")
    status = compute_status(Observed(1, GROUP, {}, done, [main, other]), T0)
    assert status["phase"] == "Succeeded"
    assert [a["uri"] for a in status["artifacts"]] == ["s3://loras/cats/pytorch_lora_weights.safetensors"]
    assert status["progress"]["step"] == 20 and status["progress"]["loss"] == 0.25
    assert status["lastCheckpoint"]["step"] == 20


def test_events_name_the_worker_that_failed():
    running = compute_status(Observed(1, GROUP, {}, job(), [worker(0), worker(1, node="node-b")]), T0)
    crashed = exited_worker(1, 1, summary("failed", 1, error="boom"), node="node-b")
    after = compute_status(Observed(1, GROUP, running, job(), [worker(0), crashed]), T0)
    failures = [e for e in transitions(running, after) if e.reason == Reason.WORKER_FAILED]
    assert len(failures) == 1 and failures[0].type == "Warning"
    assert "worker 1 (pod cats-train-1-aaaaa on node node-b) failed" in failures[0].message
    assert "boom" in failures[0].message
    again = compute_status(Observed(1, GROUP, after, job(), [worker(0), crashed]), T0)
    assert not [e for e in transitions(after, again) if e.reason == Reason.WORKER_FAILED]  # once per failure


def test_a_worker_failed_and_replaced_between_two_looks_is_still_named():
    """A lost node's pod is marked Failed and replaced at once: the operator may first see it beside its
    replacement, or only its replacement after having seen it failed; either way one WorkerFailed names it."""
    running = compute_status(Observed(1, GROUP, {}, job(), [worker(0), worker(1, node="node-b")]), T0)
    lost = exited_worker(1, 137, node="node-b", reason="ContainerStatusUnknown")
    replacement = worker(1, name="cats-train-1-bbbbb", created="2026-01-02T03:05:00Z", phase="Pending", node=None)
    both = compute_status(Observed(1, GROUP, running, job(), [worker(0), lost, replacement]), T0)
    assert both["workers"][1]["pod"] == "cats-train-1-bbbbb" and both["workers"][1]["attempts"] == 2
    assert both["workers"][1]["lastFailure"]["pod"] == "cats-train-1-aaaaa"
    assert both["workers"][1]["lastFailure"]["node"] == "node-b"
    failures = [e for e in transitions(running, both) if e.reason == Reason.WORKER_FAILED]
    assert len(failures) == 1 and "worker 1 (pod cats-train-1-aaaaa on node node-b) failed" in failures[0].message
    gone = compute_status(Observed(1, GROUP, both, job(), [worker(0), replacement]), T0)  # the failed pod removed
    assert gone["workers"][1]["lastFailure"] == both["workers"][1]["lastFailure"]
    assert not [e for e in transitions(both, gone) if e.reason == Reason.WORKER_FAILED]  # once per failed pod

    seen_failed = compute_status(Observed(1, GROUP, running, job(), [worker(0), lost]), T0)
    later = compute_status(Observed(1, GROUP, seen_failed, job(), [worker(0), replacement]), T0)
    assert later["workers"][1]["lastFailure"]["pod"] == "cats-train-1-aaaaa"
    assert len([e for e in transitions(running, seen_failed) if e.reason == Reason.WORKER_FAILED]) == 1
    assert not [e for e in transitions(seen_failed, later) if e.reason == Reason.WORKER_FAILED]


def test_pods_stopped_by_a_release_are_no_worker_failures():
    released = {"scheduling": {"releases": 1, "retryAt": "2026-01-02T03:10:00Z", "message": "stuck"}}
    running = compute_status(Observed(1, GROUP, {}, job(), [worker(0), worker(1, node="node-b")]), T0)
    stopped = [exited_worker(0, 143), exited_worker(1, 143, node="node-b")]
    suspended = compute_status(Observed(1, GROUP, {**running, **released}, job(suspend=True), stopped), T0)
    assert suspended["reason"] == Reason.WORKERS_UNSCHEDULABLE
    assert not [e for e in transitions(running, suspended) if e.reason == Reason.WORKER_FAILED]
    fresh = [worker(i, name=f"cats-train-{i}-ccccc", created="2026-01-02T03:11:00Z", phase="Pending") for i in (0, 1)]
    retried = compute_status(Observed(1, GROUP, suspended, job(), [*stopped, *fresh]), T0)
    assert [w["attempts"] for w in retried["workers"]] == [2, 2]
    assert not [e for e in transitions(suspended, retried) if e.reason == Reason.WORKER_FAILED]


def test_a_single_node_job_has_one_worker_and_no_worker_events():
    running = compute_status(Observed(1, SPEC, {}, job(), [pod()]), T0)
    assert [(w["index"], w["pod"], w["phase"]) for w in running["workers"]] == [(0, "cats-train-aaaaa", "Running")]
    crashed = compute_status(Observed(1, SPEC, running, job(), [exited(1, summary("failed", 1))]), T0)
    assert Reason.WORKER_FAILED not in [e.reason for e in transitions(running, crashed)]


# -- gang scheduling: release a half-scheduled group, retry later

from lora_operator.settings import Settings  # noqa: E402
from lora_operator.status import plan_group  # noqa: E402

GANG = Settings(group_scheduling_timeout=60, group_retry_seconds=30, group_retry_max_seconds=100)


def plan(pods, status=None, spec=GROUP, the_job=None, now=T0):
    return plan_group(Observed(1, spec, status or {}, the_job or job(), pods), now, GANG)


HALF = [worker(0), unschedulable_worker(1, since="2026-01-02T03:02:00Z")]  # T0 is 3:04:05: stuck 125 s

PLAN_CASES = [
    # (id, pods, status, spec, now, suspend, scheduling)
    ("single-node-follows-spec", [pod()], {}, SPEC, T0, False, None),
    ("single-node-suspended-by-user", [pod()], {}, {**SPEC, "suspend": True}, T0, True, None),
    ("whole-group-running", [worker(0), worker(1)], {}, GROUP, T0, False, None),
    ("nothing-held-nothing-to-release", [unschedulable_worker(0), unschedulable_worker(1)], {}, GROUP, T0, False, None),
    (
        "half-scheduled-within-the-timeout",
        [worker(0), unschedulable_worker(1, since="2026-01-02T03:03:30Z")],
        {},
        GROUP,
        T0,
        False,
        None,
    ),
    (
        "half-scheduled-too-long-is-released",
        HALF,
        {},
        GROUP,
        T0,
        True,
        {"releases": 1, "retryAt": "2026-01-02T03:04:35Z"},
    ),
    (
        "released-again-waits-twice-as-long",
        HALF,
        {"scheduling": {"releases": 1, "message": "x"}},
        GROUP,
        T0,
        True,
        {"releases": 2, "retryAt": "2026-01-02T03:05:05Z"},
    ),
    (
        "the-wait-is-bounded",
        HALF,
        {"scheduling": {"releases": 7, "message": "x"}},
        GROUP,
        T0,
        True,
        {"releases": 8, "retryAt": "2026-01-02T03:05:45Z"},
    ),
    (
        "released-until-retry-at",
        [],
        {"scheduling": {"releases": 1, "retryAt": "2026-01-02T03:05:00Z", "message": "x"}},
        GROUP,
        T0,
        True,
        None,
    ),
    (
        "retry-at-reached-resumes",
        [],
        {"scheduling": {"releases": 1, "retryAt": "2026-01-02T03:04:00Z", "message": "x"}},
        GROUP,
        T0,
        False,
        {"releases": 1, "message": "x"},
    ),
    (
        "the-users-suspend-wins-and-cancels-the-retry",
        [],
        {"scheduling": {"releases": 1, "retryAt": "2026-01-02T03:05:00Z", "message": "x"}},
        {**GROUP, "suspend": True},
        T0,
        True,
        {"releases": 1, "message": "x"},
    ),
]


@pytest.mark.parametrize("name,pods,status,spec,now,suspend,scheduling", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_group(name, pods, status, spec, now, suspend, scheduling):
    result = plan(pods, status, spec, now=now)
    assert result.suspend is suspend
    if scheduling is None:
        assert result.scheduling is None
    else:  # a release writes why; a resume keeps what the release wrote
        assert result.scheduling.get("message")
        assert {k: v for k, v in result.scheduling.items() if k != "message"} == {
            k: v for k, v in scheduling.items() if k != "message"
        }


def test_a_released_group_says_why_and_when_it_retries():
    decided = plan(HALF)
    assert "1 of 2 workers could not be scheduled for 60 s" in decided.scheduling["message"]
    assert (
        "2 Insufficient memory" in decided.scheduling["message"]
        and "1 held their nodes" in decided.scheduling["message"]
    )
    status = compute_status(Observed(1, GROUP, {"scheduling": decided.scheduling}, job(suspend=True), HALF), T0)
    assert (status["phase"], status["reason"]) == ("Pending", Reason.WORKERS_UNSCHEDULABLE)
    assert "1 of 2 workers could not be scheduled" in status["message"]
    assert "retrying at 2026-01-02T03:04:35Z (release 1)" in status["message"]
    assert Reason.WORKERS_UNSCHEDULABLE in [e.reason for e in transitions({"phase": "Pending"}, status)]
    events = [e for e in transitions({"phase": "Pending"}, status) if e.reason == Reason.WORKERS_UNSCHEDULABLE]
    assert events[0].type == "Warning"


def test_a_finished_group_is_never_released():
    done = job(conditions=[("Complete", "CompletionsReached", "")])
    assert plan(HALF, the_job=done).suspend is False


def test_plan_group_says_when_to_look_again():
    within = [worker(0), unschedulable_worker(1, since="2026-01-02T03:03:45Z")]  # 20 s of the 60 s timeout
    assert plan(within).recheck == 40
    assert plan(HALF).recheck == 30  # released: the retry in 30 s
    waiting = {"scheduling": {"releases": 1, "retryAt": "2026-01-02T03:05:00Z", "message": "x"}}
    assert plan([], waiting).recheck == 55
    assert plan([worker(0), worker(1)]).recheck is None


def test_what_a_pod_reports_outside_the_contract_never_reaches_status():
    """A hostile trainer image: artifacts and checkpoints outside spec.output.uri, a NaN loss, a checkpoint
    time of its own choosing, a metrics checkpoint label elsewhere: dropped, the rest counts."""
    spec = {**SPEC, "output": {"uri": "s3://loras/cats"}}
    done = (
        '{"status": "succeeded", "exitCode": 0, "step": 20, "totalSteps": 20, "loss": NaN, "artifacts": ['
        '{"uri": "s3://loras/cats/pytorch_lora_weights.safetensors", "format": "diffusers"},'
        '{"uri": "s3://loras/other-job/pytorch_lora_weights.safetensors", "format": "diffusers"}, 5],'
        '"lastCheckpoint": {"step": 20, "uri": "s3://elsewhere/state_step_20", "time": "1999-01-01T00:00:00Z"}}'
    )
    the_job = job(conditions=[("Complete", "CompletionsReached", "")], completion="2026-01-02T03:09:00Z")
    status = compute_status(Observed(1, spec, {}, the_job, [exited(0, done)]), T0)
    assert status["phase"] == "Succeeded"
    assert status["artifacts"] == [{"uri": "s3://loras/cats/pytorch_lora_weights.safetensors", "format": "diffusers"}]
    assert "lastCheckpoint" not in status and "loss" not in status["progress"]
    json.dumps(status, allow_nan=False)  # what is patched is valid JSON
    ckpt = summary("interrupted", 143, step=5, lastCheckpoint={"step": 5, "uri": "s3://loras/cats/c", "time": "x"})
    status = compute_status(Observed(1, spec, {}, job(), [exited(143, ckpt)]), T0)
    assert status["lastCheckpoint"] == {"step": 5, "uri": "s3://loras/cats/c", "time": "2026-01-02T03:04:05Z"}
    sample = ProgressSample(step=3, total_steps=9, checkpoint_step=2, checkpoint_uri="s3://elsewhere/ckpt")
    running = compute_status(Observed(1, spec, {}, job(), [pod(phase="Running")], sample), T0)
    assert "lastCheckpoint" not in running and running["progress"]["step"] == 3
