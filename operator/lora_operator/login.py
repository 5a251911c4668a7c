"""Kubernetes credentials for kopf and for our own client: in-cluster service account, else KUBECONFIG."""

from __future__ import annotations

import os

import kopf

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def in_cluster(sa_dir: str = SA_DIR, environ: os._Environ | dict | None = None) -> kopf.ConnectionInfo | None:
    """The pod's service account, at KUBERNETES_SERVICE_HOST:PORT as client-go's in-cluster config does
    (kopf's own helper assumes the kubernetes.default.svc DNS name). The token file is re-read on every
    login, so rotated projected tokens keep working after a 401."""
    environ = os.environ if environ is None else environ
    token_path = os.path.join(sa_dir, "token")
    if not os.path.exists(token_path):
        return None
    with open(token_path, encoding="utf-8") as f:
        token = f.read().strip()
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
    if host:
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    else:
        server = "https://kubernetes.default.svc"
    ca_path = os.path.join(sa_dir, "ca.crt")
    namespace = None
    if os.path.exists(os.path.join(sa_dir, "namespace")):
        with open(os.path.join(sa_dir, "namespace"), encoding="utf-8") as f:
            namespace = f.read().strip() or None
    return kopf.ConnectionInfo(
        server=server,
        ca_path=ca_path if os.path.exists(ca_path) else None,
        token=token or None,
        default_namespace=namespace,
    )


def login() -> kopf.ConnectionInfo | None:
    info = in_cluster()
    if info is not None:
        return info
    return kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
