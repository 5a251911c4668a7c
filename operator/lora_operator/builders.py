"""Pure functions that build a LoRATrainingJob's children: the trainer ConfigMap, the batch/v1 Job and, for a
multi-node job, the headless Service of its workers.

Nothing here talks to the API server; each builder takes the job's body and the operator settings and
returns a dict (tests/unit/test_operator_builders.py). Retries, back-off, suspension, deadlines and clean-up
after finishing are the Job controller's: the Job gets podFailurePolicy, backoffLimit (per worker index when
several nodes train), suspend, activeDeadlineSeconds and ttlSecondsAfterFinished instead of the operator
re-implementing them. Restarting the workers of a group is PyTorch elastic's, inside the trainer.
"""

from __future__ import annotations

import copy
import re
from decimal import Decimal
from typing import Any

import kopf
import yaml

from lora_trainer.config import build_config, config_fields, config_from_spec
from lora_trainer.errors import ConfigError

from .names import (
    API_VERSION,
    COMPLETION_INDEX_ANNOTATION,
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
from .pods import group_size
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
# Shared memory: data-loader workers pass batches and NCCL passes buffers through /dev/shm, which container
# runtimes make 64 MiB by default. A memory-backed emptyDir's pages count against the container's memory
# limit, so half of spec.resources.memory: room for several batches and NCCL's buffers (a few MiB per
# peer), and the other half always left to the trainer itself. Without a memory request the kubelet sizes
# it to the pod's memory (no limit: the node's).
SHM_DIR = "/dev/shm"
SHM_FRACTION = 0.5
# Multi-node jobs. 29400: torchrun's default rendezvous port (the c10d TCPStore on the first worker).
RENDEZVOUS_PORT = 29400
# In-place group restarts: when a worker process dies, PyTorch elastic restarts every worker of every pod
# from the newest checkpoint, without new pods (seconds, where a new pod takes minutes to start, download
# and load). 3: a transient fault (a NCCL timeout, a lost peer) rarely strikes three times in a row, while
# a bug fails the same way each time; past it the pod fails and the Job's per-worker retries take over.
MAX_GROUP_RESTARTS = 3


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
    children = children_of(job)
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


def children_of(job: dict[str, Any]) -> Children:
    """The child names of a job (a multi-node job also has a Service, and its Job leaves room for indexes)."""
    return Children.of(job["metadata"]["name"], group_size(job.get("spec") or {}))


def build_training_job(job: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The batch/v1 Job that runs the trainer: one pod at a time retried by the Job controller, or for a
    multi-node job an Indexed Job with one pod per node, each index retried on its own."""
    spec = job.get("spec") or {}
    children = children_of(job)
    labels = labels_for(job, "trainer")
    job_spec: dict[str, Any] = {
        **retry_policy(spec),
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


def retry_policy(spec: dict[str, Any]) -> dict[str, Any]:
    """How many pods run and how often they are retried.

    One node: one pod, `backoffLimit` failures retried. Several nodes: an Indexed Job (pod i is worker i,
    reachable as <job>-<i>.<service>), all started together; each index may fail `backoffLimit` times
    (backoffLimitPerIndex), so a group failure that takes down every pod costs each worker one retry, not
    one per pod from one budget, and the first index past its limit fails the Job at once (maxFailedIndexes
    0: a group missing a worker cannot train). The Job-level backoffLimit is then left to the API's default.
    """
    limit = int(spec.get("backoffLimit", 3))  # 3: the CRD's default
    nodes = group_size(spec)
    if nodes == 1:
        return {"completions": 1, "parallelism": 1, "backoffLimit": limit}
    return {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimitPerIndex": limit,
        "maxFailedIndexes": 0,
    }


def build_worker_service(job: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The headless Service of a multi-node job's workers (its name is their pods' `subdomain`).

    Cluster DNS then resolves <job>-<index>.<service>.<namespace>.svc.<cluster domain> (the host name the
    Job controller gives each indexed pod) to that pod's IP, also before the pod is ready
    (publishNotReadyAddresses): the workers find the rendezvous on worker 0 while they start.
    """
    meta = job["metadata"]
    children = children_of(job)
    body = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": children.service, "labels": labels_for(job, "workers")},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {
                JOB_LABEL: meta["name"],
                COMPONENT_LABEL: "trainer",
                "batch.kubernetes.io/job-name": children.job,
            },
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}
            ],
        },
    }
    kopf.adopt(body, owner=_owner(job))
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
            {"name": "shm", "emptyDir": shm_volume(resources.get("memory"))},
        ],
    }
    if children.service:
        pod["subdomain"] = children.service  # <job>-<index>.<service>: the workers' DNS names
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
    ports = [{"name": "metrics", "containerPort": settings.trainer_metrics_port, "protocol": "TCP"}]
    if group_size(spec) > 1:
        ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.get("image") or settings.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["lora-train"],
        "args": ["--config", CONFIG_PATH],
        "env": trainer_env(job, settings),
        "ports": ports,
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
            {"name": "shm", "mountPath": SHM_DIR},
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
        {"name": "LORA_JOB_UID", "value": job["metadata"]["uid"]},  # the owner of the output prefix
        {"name": "LORA_CONFIG", "value": CONFIG_PATH},
        {"name": "LORA_METRICS_PORT", "value": str(settings.trainer_metrics_port)},
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH_DIR}/.cache"},
        {"name": "HF_HOME", "value": f"{SCRATCH_DIR}/.cache/huggingface"},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH_DIR}/.config/matplotlib"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += distributed_env(job, settings)
    env += s3_env(s3, settings)
    return env


def processes_per_node(spec: dict[str, Any]) -> int:
    """Worker processes in each trainer pod: one per GPU; on CPU (gpus 0) resources.processesPerNode, else 1."""
    resources = spec.get("resources") or {}
    gpus = int(resources.get("gpus", 1))
    if gpus > 0:
        return gpus
    return max(int(resources.get("processesPerNode") or 1), 1)


def distributed_env(job: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """What PyTorch's elastic launcher in the trainer needs (docs/operator.md, "Distributed training"):
    processes per pod always; for several nodes the node count, this pod's rank (its completion index),
    the rendezvous on worker 0, an id shared by the group and the in-place restarts."""
    spec = job.get("spec") or {}
    env = [{"name": "LORA_NPROC_PER_NODE", "value": str(processes_per_node(spec))}]
    nodes = group_size(spec)
    if nodes == 1:
        return env
    meta = job["metadata"]
    return env + [
        {"name": "LORA_NNODES", "value": str(nodes)},
        {
            "name": "LORA_NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}},
        },
        {"name": "LORA_RDZV_ENDPOINT", "value": rendezvous_endpoint(job, settings)},
        {"name": "LORA_RDZV_ID", "value": meta.get("uid") or meta["name"]},
        {"name": "LORA_MAX_RESTARTS", "value": str(MAX_GROUP_RESTARTS)},
    ]


def rendezvous_endpoint(job: dict[str, Any], settings: Settings) -> str:
    """host:port of the rendezvous: worker 0's fully qualified DNS name (the host name the Job controller
    gives index 0, under the workers' Service) and torchrun's port."""
    children = children_of(job)
    host = f"{children.job}-0.{children.service}.{job['metadata']['namespace']}.svc.{settings.cluster_domain}"
    return f"{host}:{RENDEZVOUS_PORT}"


def shm_volume(memory: Any) -> dict[str, Any]:
    """The in-memory emptyDir for /dev/shm, limited to SHM_FRACTION of the memory request (see there)."""
    volume: dict[str, Any] = {"medium": "Memory"}
    if memory is not None:
        volume["sizeLimit"] = f"{int(quantity_bytes(memory) * SHM_FRACTION) // 2**20}Mi"
    return volume


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?|\.[0-9]+)([KMGTPE]i|[kMGTPE]|[eE][0-9]+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def quantity_bytes(value: Any) -> int:
    """A memory quantity as the CRD admits it (32Gi, 512Mi, 1G, 1e9, 1000) in bytes."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"not a memory quantity: {value!r}")
    number, suffix = Decimal(match.group(1)), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return int(number * 10 ** int(suffix[1:]))
    return int(number * (_BINARY.get(suffix) or _DECIMAL.get(suffix) or 1))


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
# the trainer image's cleanup (lora_trainer/cleanup.py): deletes only what this job owns under the prefix
CLEANUP_MODULE = "lora_trainer.cleanup"


def build_cleanup_job(job: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A Job that deletes spec.output.uri (cleanupPolicy DeleteOutputs), run while the job is deleted.

    It is not owned by the LoRATrainingJob (that is being deleted); ttlSecondsAfterFinished removes it.
    """
    spec = job.get("spec") or {}
    meta = job["metadata"]
    children = children_of(job)
    trainer = build_trainer_container(job, settings)
    container = {
        "name": "cleanup",
        "image": trainer["image"],
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", CLEANUP_MODULE, spec["output"]["uri"], f"job:{meta['uid']}"],
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
    pod.pop("subdomain", None)
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
