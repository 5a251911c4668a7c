"""API identifiers, labels, annotations, the key of a job and the deterministic names of its children."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

GROUP = "lora-operator.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LoRATrainingJob"
PLURAL = "loratrainingjobs"

# Labels on every child (and on the trainer pods through the Job's pod template).
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "lora-operator"
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
JOB_LABEL = f"{GROUP}/job-name"  # the owning LoRATrainingJob's name
CONTAINER = "trainer"  # the trainer container's name (the podFailurePolicy rule names it)
FINALIZER = f"{GROUP}/cleanup"  # only on jobs whose cleanupPolicy deletes outputs
ANNOTATION_PREFIX = GROUP  # kopf keeps its handler progress in annotations under this prefix
# On the cleanup Job, which no ownerReference ties to its (deleted) job: the uid of the job it cleans up after,
# so a cleanup Job left over from an earlier job of the same name is recognised and removed.
OWNER_UID_ANNOTATION = f"{GROUP}/owner-uid"

# A Job's name becomes the `batch.kubernetes.io/job-name` label of its pods, so it must be a valid
# label value (<= 63 characters); the Job controller also appends 6 characters for pod names.
MAX_CHILD_NAME = 63
# Set by the Job controller on the pods of an Indexed Job: the worker's index (annotation and label).
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# A multi-node job's pods get the hostname <job>-<index> from the Job controller, a DNS label of at most
# 63 characters: with up to 64 nodes (the CRD's maximum) the index takes up to 3 of them ("-63").
INDEX_SUFFIX_ROOM = 3


@dataclass(frozen=True, order=True)
class JobKey:
    """How the operator addresses a LoRATrainingJob: its namespace and name ("ns/name" as text).

    Every per-job table (locks, poller schedule, last scrape) is keyed by it: children events name their
    job only by the `job-name` label, and a job deleted and created again under the same name owns the
    same child names, so it must be serialized with its predecessor. The uid is used only where the
    object itself matters rather than the name: the operator's metrics (one entry per object) and the
    cleanup Job's OWNER_UID_ANNOTATION.
    """

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, body: dict[str, Any]) -> JobKey:
        meta = body["metadata"]
        return cls(meta["namespace"], meta["name"])


def ltj_path(namespace: str, name: str | None = None, status: bool = False) -> str:
    path = f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
    if name:
        path += f"/{name}"
        if status:
            path += "/status"
    return path


def child_name(owner: str, suffix: str, limit: int = MAX_CHILD_NAME) -> str:
    """`<owner>-<suffix>`, or a truncated owner plus a short hash when that would be too long.

    Deterministic: the same owner always gets the same names, so a restarted operator finds the
    children it created before (and never makes a second Job).
    """
    name = f"{owner}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(owner.encode()).hexdigest()[:8]  # 8 hex digits: collisions are negligible
    head = owner[: limit - len(suffix) - len(digest) - 2].rstrip("-.")
    return f"{head}-{digest}-{suffix}"


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def child_label(owner: str, suffix: str, limit: int = MAX_CHILD_NAME) -> str:
    """`<owner>-<suffix>` as a DNS-1035 label (a letter first, no dots), for children whose name becomes a
    host name: a Service, and the Job whose pods are called <job>-<index> in DNS. An owner name that is
    not one already (`team.cats`, `7cats`) is spelt with '-' for '.', a letter in front and its hash, so two
    owners never share the name."""
    name = f"{owner}-{suffix}"
    if len(name) <= limit and _DNS_1035.match(name):
        return name
    digest = hashlib.sha256(owner.encode()).hexdigest()[:8]  # 8 hex digits, as child_name
    head = re.sub(r"[^a-z0-9-]", "-", owner)
    if not head[:1].isalpha():
        head = "j" + head
    head = head[: limit - len(suffix) - len(digest) - 2].rstrip("-")
    return f"{head}-{digest}-{suffix}"


@dataclass(frozen=True)
class Children:
    """The names of a job's children; recorded in status.children before they are created.

    A multi-node job (spec.resources.nodes > 1) also owns a headless Service, the `subdomain` of its
    worker pods, and its Job's name leaves room for the worker index in their host names.
    """

    config_map: str
    job: str
    cleanup_job: str
    service: str | None = None

    @classmethod
    def of(cls, owner: str, nodes: int = 1) -> Children:
        if nodes <= 1:
            return cls(child_name(owner, "config"), child_name(owner, "train"), child_name(owner, "cleanup"))
        return cls(
            child_name(owner, "config"),
            child_label(owner, "train", MAX_CHILD_NAME - INDEX_SUFFIX_ROOM),
            child_name(owner, "cleanup"),
            child_label(owner, "workers"),
        )

    def as_status(self) -> dict[str, str]:
        names = {"configMap": self.config_map, "job": self.job}
        if self.service:
            names["service"] = self.service
        return names


def is_dns_label(text: str) -> bool:
    """An RFC 1123 DNS label, as namespace names are: lowercase alphanumerics and '-', at most 63 characters."""
    return len(text) <= 63 and bool(_DNS_LABEL.match(text))
