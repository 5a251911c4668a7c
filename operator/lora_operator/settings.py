"""Every operator setting, read from the environment in one place (`Settings.from_env`).

A bad value stops the operator at start with one message that lists every problem and names the
variable, e.g. `LORA_OPERATOR_POLL_INTERVAL: expected a number of seconds > 0, got 'soon'`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .names import is_dns_label

PREFIX = "LORA_OPERATOR_"
DEFAULT_TRAINER_IMAGE = f"ghcr.io/lora-operator/trainer:{__version__}"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class SettingsError(ValueError):
    """The environment does not describe a valid configuration; the message lists every problem."""


def _env(name: str, doc: str, default: Any = None, parse: str = "str", **meta: Any) -> Any:
    return field(default=default, metadata={"env": PREFIX + name, "doc": doc, "parse": parse, **meta})


@dataclass(frozen=True)
class Settings:
    """The operator's configuration. Each field is read from its LORA_OPERATOR_* variable."""

    trainer_image: str = _env(
        "TRAINER_IMAGE", "Trainer image of jobs that set no spec.image.", DEFAULT_TRAINER_IMAGE, "image"
    )
    s3_endpoint: str | None = _env(
        "S3_ENDPOINT", "S3 endpoint URL of jobs that set no spec.s3.endpoint (unset: the AWS default).", None, "url"
    )
    s3_region: str | None = _env("S3_REGION", "S3 region of jobs that set no spec.s3.region.", None)
    s3_credentials_secret: str | None = _env(
        "S3_CREDENTIALS_SECRET",
        "Secret (in the job's namespace) with AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY for jobs that set no spec.s3.credentialsSecret (unset: none, e.g. IRSA).",
        None,
        "dns",
    )
    watch_namespaces: tuple[str, ...] = _env(
        "WATCH_NAMESPACES", "Comma-separated namespaces to serve; empty: the whole cluster.", (), "namespaces"
    )
    poll_interval: float = _env(
        "POLL_INTERVAL", "Seconds between status refreshes (metrics scrape) of a running job.", 5.0, "seconds"
    )
    scrape_timeout: float = _env("SCRAPE_TIMEOUT", "Seconds to wait for a trainer's metrics endpoint.", 2.0, "seconds")
    trainer_metrics_port: int = _env("TRAINER_METRICS_PORT", "Port of the trainer's metrics endpoint.", 9400, "port")
    termination_grace_seconds: int = _env(
        "TERMINATION_GRACE_SECONDS",
        "Trainer pods' terminationGracePeriodSeconds: time for the "
        "SIGTERM checkpoint on suspend, eviction or deletion.",
        300,
        "count",
    )
    trainer_run_as_user: int = _env("TRAINER_RUN_AS_USER", "Non-root UID of trainer pods.", 1000, "uid")
    trainer_service_account: str | None = _env(
        "TRAINER_SERVICE_ACCOUNT",
        "ServiceAccount of trainer pods (unset: the namespace default, with no token mounted).",
        None,
        "dns",
    )
    cluster_domain: str = _env(
        "CLUSTER_DOMAIN",
        "DNS domain of the cluster (the kubelet's --cluster-domain): multi-node workers find worker 0 at "
        "<pod>.<service>.<namespace>.svc.<domain>.",
        "cluster.local",
        "dns",
    )
    group_scheduling_timeout: float = _env(
        "GROUP_SCHEDULING_TIMEOUT",
        "Seconds a multi-node job may wait with some workers unschedulable while others hold their nodes; "
        "then every worker is released (the Job suspended) until a retry.",
        300.0,
        "seconds",
    )
    group_retry_seconds: float = _env(
        "GROUP_RETRY_SECONDS",
        "Seconds a released multi-node job waits before it tries again; doubled at each further release.",
        60.0,
        "seconds",
    )
    group_retry_max_seconds: float = _env(
        "GROUP_RETRY_MAX_SECONDS", "The longest wait between two tries of a released multi-node job.", 900.0, "seconds"
    )
    http_port: int = _env("HTTP_PORT", "Port of /metrics, /healthz and /readyz.", 8080, "port")
    http_host: str = _env("HTTP_HOST", "Address that port binds.", "0.0.0.0")
    leader_election: bool = _env(
        "LEADER_ELECTION", "Elect one active replica with a coordination.k8s.io Lease (true/false).", True, "bool"
    )
    lease_name: str = _env("LEASE_NAME", "Name of the leader-election Lease.", "lora-operator", "dns")
    lease_namespace: str | None = _env(
        "LEASE_NAMESPACE", "Namespace of the Lease (default: the pod's own namespace, else 'default').", None, "dns"
    )
    lease_duration: float = _env("LEASE_DURATION", "Seconds a leader's Lease lasts without renewal.", 15.0, "seconds")
    identity: str | None = _env(
        "IDENTITY", "This replica's name in the Lease (default: POD_NAME, else hostname-pid).", None
    )
    log_level: str = _env("LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.", "INFO", "level")

    @property
    def clusterwide(self) -> bool:
        return not self.watch_namespaces

    @property
    def renew_interval(self) -> float:
        """Three renewals per lease duration, so a failed one is retried before the leader gives up
        (leader.RENEW_DEADLINE); never more often than twice a second."""
        return max(self.lease_duration / 3, 0.5)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or (raw.strip() == "" and f.metadata["parse"] != "namespaces"):
                continue
            try:
                values[f.name] = PARSERS[f.metadata["parse"]](raw.strip())
            except ValueError as err:
                problems.append(f"{f.metadata['env']}: {err}, got {raw!r}")
        known = {f.metadata["env"] for f in dataclasses.fields(cls)}
        for name in sorted(environ):
            if name.startswith(PREFIX) and name not in known:
                problems.append(f"{name}: unknown setting (known: {', '.join(sorted(known))})")
        if problems:
            raise SettingsError("invalid operator settings:\n" + "\n".join(f"  - {p}" for p in problems))
        settings = cls(**values)
        if settings.lease_namespace is None:
            settings = dataclasses.replace(settings, lease_namespace=_own_namespace(environ))
        if settings.identity is None:
            settings = dataclasses.replace(
                settings, identity=environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
            )
        return settings

    @classmethod
    def reference(cls) -> list[tuple[str, str, str]]:
        """(variable, default, description) rows for docs/operator.md."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default
            shown = ",".join(default) if isinstance(default, tuple) else ("" if default is None else str(default))
            rows.append((f.metadata["env"], shown.lower() if isinstance(default, bool) else shown, f.metadata["doc"]))
        return rows


def _own_namespace(environ: Mapping[str, str]) -> str:
    if environ.get("POD_NAMESPACE"):
        return environ["POD_NAMESPACE"]
    try:
        with open(SA_NAMESPACE_FILE, encoding="utf-8") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _dns(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise ValueError("expected a Kubernetes object name (lowercase letters, digits, '-' and '.')")
    return value


def _namespaces(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if not is_dns_label(n)]
    if bad:
        raise ValueError(f"{', '.join(bad)} is not a namespace name")
    return tuple(dict.fromkeys(names))


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("expected a number of seconds > 0") from None
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError("expected a number of seconds > 0")
    return number


def _int_in(lo: int, hi: int, what: str) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"expected {what}") from None
        if not lo <= number <= hi:
            raise ValueError(f"expected {what}")
        return number

    return parse


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _url(value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value):
        raise ValueError("expected an http:// or https:// URL")
    return value


def _image(value: str) -> str:
    if re.search(r"\s", value):
        raise ValueError("expected an image reference without spaces")
    return value


def _level(value: str) -> str:
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return value.upper()


PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "image": _image,
    "url": _url,
    "dns": _dns,
    "namespaces": _namespaces,
    "seconds": _seconds,
    "port": _int_in(1, 65535, "a port number 1-65535"),
    "count": _int_in(0, 10**6, "a whole number of seconds >= 0"),
    "uid": _int_in(1, 2**31 - 1, "a non-root UID (>= 1)"),
    "bool": _bool,
    "level": _level,
}
