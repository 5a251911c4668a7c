"""A throw-away PKI for the test control plane, made with the `openssl` command line tool.

EC P-256 keys keep generation fast. Everything lands in one directory that the session deletes.
"""

import subprocess
from dataclasses import dataclass
from pathlib import Path

APISERVER_SANS = (
    "IP:127.0.0.1",
    "IP:10.0.0.1",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: KeyPair
    apiserver: KeyPair  # serving certificate of kube-apiserver
    admin: KeyPair  # system:masters client: kubectl, tests, node agent
    controller_manager: KeyPair
    apiserver_kubelet_client: KeyPair  # apiserver -> node agent (pods/log)
    service_account_key: Path  # signs service-account tokens (kube-controller-manager, apiserver)
    service_account_pub: Path


def extensions(usage, sans=()):
    """The openssl x509 extension file for a leaf certificate ('serverAuth' or 'clientAuth')."""
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usage}",
    ]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    return "\n".join(lines) + "\n"


def subject(common_name, organization=None):
    return f"/CN={common_name}" + (f"/O={organization}" if organization else "")


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ec_key(path):
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


def make_ca(directory, name="lora-test-ca"):
    pair = KeyPair(directory / "ca.crt", directory / "ca.key")
    _ec_key(pair.key)
    _openssl(
        "req", "-x509", "-new", "-key", str(pair.key), "-out", str(pair.cert), "-days", "3650", "-subj", subject(name)
    )
    return pair


def make_leaf(directory, name, ca, subj, usage, sans=()):
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    _ec_key(pair.key)
    ext.write_text(extensions(usage, sans))
    _openssl("req", "-new", "-key", str(pair.key), "-out", str(csr), "-subj", subj)
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca.cert),
        "-CAkey",
        str(ca.key),
        "-CAcreateserial",
        "-out",
        str(pair.cert),
        "-days",
        "3650",
        "-extfile",
        str(ext),
    )
    return pair


def make_pki(directory):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory)
    sa_key, sa_pub = directory / "sa.key", directory / "sa.pub"
    _ec_key(sa_key)
    _openssl("pkey", "-in", str(sa_key), "-pubout", "-out", str(sa_pub))
    return Pki(
        ca=ca,
        apiserver=make_leaf(directory, "apiserver", ca, subject("kube-apiserver"), "serverAuth", APISERVER_SANS),
        admin=make_leaf(directory, "admin", ca, subject("lora-test-admin", "system:masters"), "clientAuth"),
        controller_manager=make_leaf(
            directory, "controller-manager", ca, subject("system:kube-controller-manager"), "clientAuth"
        ),
        apiserver_kubelet_client=make_leaf(
            directory,
            "apiserver-kubelet-client",
            ca,
            subject("kube-apiserver-kubelet-client", "system:masters"),
            "clientAuth",
        ),
        service_account_key=sa_key,
        service_account_pub=sa_pub,
    )


def make_serving_cert(directory, name, ca, sans):
    """A serving certificate signed by the cluster CA (the node agent's log endpoint uses one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return make_leaf(directory, name, ca, subject(name), "serverAuth", sans)
