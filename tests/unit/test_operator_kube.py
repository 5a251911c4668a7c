"""The operator's API client: TLS material from a kubeconfig is loaded without leaving a key file on disk."""

import base64
import os
import shutil
import ssl
import stat
import subprocess
import tempfile

import kopf
import pytest

from lora_operator import kube

OPENSSL = shutil.which("openssl")


def self_signed(folder, name):
    """(certificate PEM, private key PEM) of a fresh self-signed certificate."""
    if OPENSSL is None:
        pytest.skip("no openssl binary")
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            OPENSSL,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return cert.read_bytes(), key.read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    return {"client": self_signed(folder, "lora-client"), "other": self_signed(folder, "lora-other")}


@pytest.fixture()
def temp_dir(tmp_path, monkeypatch):
    """The directory Python's tempfile writes into, watched by the test."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture()
def loads(monkeypatch):
    """Records the files load_cert_chain reads and their permissions while they exist."""
    seen = []
    original = ssl.SSLContext.load_cert_chain

    def spy(self, certfile, keyfile=None, password=None):
        modes = [stat.S_IMODE(os.stat(path).st_mode) for path in (certfile, keyfile)]
        folder = stat.S_IMODE(os.stat(os.path.dirname(keyfile)).st_mode)
        seen.append({"cert": certfile, "key": keyfile, "modes": modes, "folder": folder})
        return original(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    return seen


def b64(data):
    return base64.b64encode(data).decode()


def test_client_certificate_and_key_data_leave_no_file_behind(pki, temp_dir, loads):
    cert, key = pki["client"]
    info = kopf.ConnectionInfo(
        server="https://127.0.0.1:6443", ca_data=b64(cert), certificate_data=b64(cert), private_key_data=b64(key)
    )  # as a kubeconfig has them: base64 of the PEM
    context = kube._ssl_context(info)
    assert isinstance(context, ssl.SSLContext)
    assert list(temp_dir.iterdir()) == []  # no key file, no directory left
    assert len(loads) == 1 and not os.path.exists(loads[0]["key"]) and not os.path.exists(loads[0]["cert"])
    assert loads[0]["modes"] == [0o600, 0o600] and loads[0]["folder"] == 0o700  # only this user could read them
    assert os.path.dirname(loads[0]["key"]).startswith(str(temp_dir))
    subjects = [dict(pair[0] for pair in ca["subject"]) for ca in context.get_ca_certs()]
    assert {"commonName": "lora-client"} in subjects  # the CA came from memory (cadata), no file at all


def test_plain_pem_data_loads_too(pki, temp_dir, loads):
    cert, key = pki["client"]
    info = kopf.ConnectionInfo(server="https://127.0.0.1:6443", certificate_data=cert, private_key_data=key)
    assert isinstance(kube._ssl_context(info), ssl.SSLContext)
    assert len(loads) == 1 and list(temp_dir.iterdir()) == []


def test_a_key_that_does_not_load_leaves_no_file_behind_either(pki, temp_dir, loads):
    cert, _ = pki["client"]
    _, wrong_key = pki["other"]
    info = kopf.ConnectionInfo(
        server="https://127.0.0.1:6443", certificate_data=b64(cert), private_key_data=b64(wrong_key)
    )
    with pytest.raises(ssl.SSLError):
        kube._ssl_context(info)
    assert len(loads) == 1 and list(temp_dir.iterdir()) == []


def test_certificate_and_key_paths_are_used_in_place(pki, tmp_path, temp_dir, loads):
    cert, key = pki["client"]
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    info = kopf.ConnectionInfo(
        server="https://127.0.0.1:6443",
        certificate_path=str(tmp_path / "c.pem"),
        private_key_path=str(tmp_path / "k.pem"),
    )
    kube._ssl_context(info)
    assert [(c["cert"], c["key"]) for c in loads] == [(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))]
    assert list(temp_dir.iterdir()) == []
