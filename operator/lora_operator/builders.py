"""Pure functions that build a LoRATrainingJob's children: the trainer ConfigMap and the batch/v1 Job.

Nothing here talks to the API server; each builder takes the job's body and the operator settings and
returns a dict (tests/unit/test_operator_builders.py). Retries, back-off, suspension, deadlines and clean-up
after finishing are the Job controller's: the Job gets podFailurePolicy, backoffLimit, suspend,
activeDeadlineSeconds and ttlSecondsAfterFinished instead of the operator re-implementing them.
"""

from __future__ import annotations

import copy
from typing import Any

import kopf
import yaml

from lora_trainer.config import build_config, config_fields, config_from_spec
from lora_trainer.errors import ConfigError

from .names import (
    API_VERSION,
    COMPONENT_LABEL,
    CONTAINER,
    JOB_LABEL,
    KIND,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    OWNER_UID_ANNOTATION,
    Children,
)
from .reasons import PERMANENT_EXIT_REASONS
from .settings import Settings

CONFIG_DIR = "/etc/lora-operator"
CONFIG_KEY = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
SCRATCH_DIR = "/scratch"  # writable emptyDir: TMPDIR, HOME and caches (the root filesystem is read-only)
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
GPU_RESOURCE = "nvidia.com/gpu"
# The cleanup Job (cleanupPolicy DeleteOutputs): deleting one prefix takes seconds to minutes, so a run past
# 10 minutes is stuck and fails (the delete handler then reports DeleteOutputsFailed before kopf's own
# 15-minute limit); a finished one stays 10 minutes, for the delete handler to see how it ended and for
# people to read its log, before the TTL controller removes it. Transient S3 errors get 3 retries.
CLEANUP_DEADLINE_SECONDS = 600
CLEANUP_TTL_SECONDS = 600
CLEANUP_BACKOFF_LIMIT = 3
CLEANUP_GRACE_SECONDS = 30  # the Kubernetes default: the script has nothing to save when stopped
# The trainer's SIGTERM checkpoint must be uploaded inside the pod's grace period: it gets all of it but
# 15 s (half of it, for grace periods under 30 s), which leaves time to exit before the kubelet's SIGKILL.
SIGTERM_MARGIN_SECONDS = 15


def trainer_config(spec: dict[str, Any], settings: Settings, *, allow_overwrite: bool = True) -> dict[str, Any]:
    """The flat trainer config of a spec (the same mapping `lora-train --config job.yaml` uses).

    The operator adds `resume: latest`, so every retry, resumption or replacement pod continues
    from the newest complete checkpoint in spec.output.uri. `overwrite` applies only until the first
    trainer has reported progress (`allow_overwrite=False` afterwards), so a retry never wipes the
    checkpoints of the attempt before it.
    """
    config = config_from_spec(spec)
    config["resume"] = "latest"
    if not allow_overwrite:
        config.pop("overwrite", None)
    known = {f.name for f in config_fields()}
    if "metrics_port" in known:
        config["metrics_port"] = settings.trainer_metrics_port
    if "termination_message_path" in known:
        config["termination_message_path"] = TERMINATION_MESSAGE_PATH
    if "sigterm_grace_seconds" in known:  # the checkpoint upload must finish inside the pod's grace period
        grace = settings.termination_grace_seconds
        config["sigterm_grace_seconds"] = float(max(grace - SIGTERM_MARGIN_SECONDS, grace // 2))
    return config


def config_problem(spec: dict[str, Any], settings: Settings) -> str | None:
    """The trainer's own validation of the config (pure: no files, no S3, no torch), or None if valid."""
    try:
        build_config(trainer_config(spec, settings), source="spec")
    except ConfigError as err:
        return str(err)
    return None


def labels_for(job: dict[str, Any], component: str) -> dict[str, str]:
    return {
        NAME_LABEL: "lora-trainer",
        COMPONENT_LABEL: component,
        MANAGED_BY_LABEL: MANAGED_BY,
        JOB_LABEL: job["metadata"]["name"],
    }


def build_config_map(job: dict[str, Any], settings: Settings, *, allow_overwrite: bool = True) -> dict[str, Any]:
    children = Children.of(job["metadata"]["name"])
    config = trainer_config(job.get("spec") or {}, settings, allow_overwrite=allow_overwrite)
    text = (
        f"# Trainer config of {KIND} {job['metadata']['namespace']}/{job['metadata']['name']}, "
        f"written by lora-operator.\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    )
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": children.config_map, "labels": labels_for(job, "config")},
        "data": {CONFIG_KEY: text},
    }
    kopf.adopt(body, owner=_owner(job))
    return body


def build_training_job(job: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The batch/v1 Job that runs the trainer (one pod at a time, retried by the Job controller)."""
    spec = job.get("spec") or {}
    meta = job["metadata"]
    children = Children.of(meta["name"])
    labels = labels_for(job, "trainer")
    job_spec: dict[str, Any] = {
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": int(spec.get("backoffLimit", 3)),  # 3: the CRD's default
        "suspend": bool(spec.get("suspend", False)),
        # A replacement pod starts only once the previous one has fully stopped, so two trainers never
        # write the same output prefix (required with podFailurePolicy anyway).
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": {
                "labels": dict(labels),
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(settings.trainer_metrics_port),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": build_pod_spec(job, settings, children),
        },
    }
    if spec.get("activeDeadlineSeconds") is not None:
        job_spec["activeDeadlineSeconds"] = int(spec["activeDeadlineSeconds"])
    if spec.get("ttlSecondsAfterFinished") is not None:
        job_spec["ttlSecondsAfterFinished"] = int(spec["ttlSecondsAfterFinished"])
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": children.job, "labels": labels},
        "spec": job_spec,
    }
    kopf.adopt(body, owner=_owner(job), nested=["spec.template"])
    return body


def pod_failure_policy() -> dict[str, Any]:
    """Permanent trainer exit codes fail the Job at once; evictions and preemptions are not failures.

    Rules are checked in order: an evicted trainer exits 143 after its checkpoint and carries the
    DisruptionTarget condition, so it is ignored (replaced without counting against backoffLimit).
    """
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": sorted(PERMANENT_EXIT_REASONS)},
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def build_pod_spec(job: dict[str, Any], settings: Settings, children: Children) -> dict[str, Any]:
    spec = job.get("spec") or {}
    resources = spec.get("resources") or {}
    gpus = int(resources.get("gpus", 1))
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.trainer_run_as_user,
            "runAsGroup": settings.trainer_run_as_user,
            "fsGroup": settings.trainer_run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [build_trainer_container(job, settings)],
        "volumes": [
            {
                "name": "config",
                "configMap": {"name": children.config_map, "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]},
            },
            {"name": "scratch", "emptyDir": {}},
        ],
    }
    if settings.trainer_service_account:
        pod["serviceAccountName"] = settings.trainer_service_account
        pod["automountServiceAccountToken"] = True  # IRSA / workload identity need the projected token
    if resources.get("nodeSelector"):
        pod["nodeSelector"] = dict(resources["nodeSelector"])
    tolerations = [dict(t) for t in resources.get("tolerations") or []]
    if gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod["tolerations"] = tolerations
    if resources.get("priorityClassName"):
        pod["priorityClassName"] = resources["priorityClassName"]
    return pod


def build_trainer_container(job: dict[str, Any], settings: Settings) -> dict[str, Any]:
    spec = job.get("spec") or {}
    resources = spec.get("resources") or {}
    gpus = int(resources.get("gpus", 1))
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if resources.get("cpu") is not None:
        requests["cpu"] = str(resources["cpu"])
    if resources.get("memory") is not None:
        requests["memory"] = limits["memory"] = str(resources["memory"])
    if gpus > 0:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(gpus)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.get("image") or settings.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["lora-train"],
        "args": ["--config", CONFIG_PATH],
        "env": trainer_env(job, settings),
        "ports": [{"name": "metrics", "containerPort": settings.trainer_metrics_port, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
        ],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if requests or limits:
        container["resources"] = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    return container


def trainer_env(job: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """The environment of docs/trainer-operator.md: pod IP, job identity, config path, S3 access."""
    spec = job.get("spec") or {}
    s3 = spec.get("s3") or {}
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "LORA_JOB_NAME", "value": job["metadata"]["name"]},
        {"name": "LORA_JOB_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "LORA_CONFIG", "value": CONFIG_PATH},
        {"name": "LORA_METRICS_PORT", "value": str(settings.trainer_metrics_port)},
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH_DIR}/.cache"},
        {"name": "HF_HOME", "value": f"{SCRATCH_DIR}/.cache/huggingface"},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH_DIR}/.config/matplotlib"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += s3_env(s3, settings)
    return env


def s3_env(s3: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    secret = s3.get("credentialsSecret") or settings.s3_credentials_secret
    if secret:
        env += [
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": secret, "key": "AWS_ACCESS_KEY_ID"}}},
            {
                "name": "AWS_SECRET_ACCESS_KEY",
                "valueFrom": {"secretKeyRef": {"name": secret, "key": "AWS_SECRET_ACCESS_KEY"}},
            },
            {
                "name": "AWS_SESSION_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": secret, "key": "AWS_SESSION_TOKEN", "optional": True}},
            },
        ]
    endpoint = s3.get("endpoint") or settings.s3_endpoint
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": endpoint})
    region = s3.get("region") or settings.s3_region
    if region:
        env += [{"name": "AWS_REGION", "value": region}, {"name": "AWS_DEFAULT_REGION", "value": region}]
    return env


# Deletes every object under one s3://bucket/prefix/ with the trainer image's boto3 (the operator never
# reads S3 credentials itself). Argument: the prefix URI.
CLEANUP_SCRIPT = """\
import sys, boto3
bucket, _, prefix = sys.argv[1][len("s3://"):].partition("/")
prefix = prefix.rstrip("/") + "/"
s3 = boto3.client("s3")
deleted = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
    if keys:
        s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        deleted += len(keys)
print(f"deleted {deleted} objects under s3://{bucket}/{prefix}")
"""


def build_cleanup_job(job: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A Job that deletes spec.output.uri (cleanupPolicy DeleteOutputs), run while the job is deleted.

    It is not owned by the LoRATrainingJob (that is being deleted); ttlSecondsAfterFinished removes it.
    """
    spec = job.get("spec") or {}
    meta = job["metadata"]
    children = Children.of(meta["name"])
    trainer = build_trainer_container(job, settings)
    container = {
        "name": "cleanup",
        "image": trainer["image"],
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-c", CLEANUP_SCRIPT, spec["output"]["uri"]],
        "env": [e for e in trainer["env"] if e["name"].startswith("AWS_") or e["name"] in ("HOME", "TMPDIR")],
        "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH_DIR}],
        "securityContext": copy.deepcopy(trainer["securityContext"]),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod = build_pod_spec(job, settings, children)
    pod.pop("tolerations", None)
    pod.pop("nodeSelector", None)
    pod.pop("priorityClassName", None)
    pod["terminationGracePeriodSeconds"] = CLEANUP_GRACE_SECONDS
    pod["containers"] = [container]
    pod["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    labels = labels_for(job, "cleanup")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": children.cleanup_job,
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": {OWNER_UID_ANNOTATION: meta.get("uid", "")},
        },
        "spec": {
            "backoffLimit": CLEANUP_BACKOFF_LIMIT,
            "ttlSecondsAfterFinished": CLEANUP_TTL_SECONDS,
            "activeDeadlineSeconds": CLEANUP_DEADLINE_SECONDS,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def _owner(job: dict[str, Any]) -> dict[str, Any]:
    """The owner body kopf.adopt needs (apiVersion/kind may be missing from a watched body)."""
    return {
        "apiVersion": job.get("apiVersion") or API_VERSION,
        "kind": job.get("kind") or KIND,
        "metadata": job["metadata"],
    }
