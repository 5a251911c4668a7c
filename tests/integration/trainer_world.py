"""Helpers for running lora-train against the real SeaweedFS, Prometheus and Pushgateway of the fixtures:
in-process through cli.main (fast), or as a real process (signals, outages, metrics scraped from outside)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "trainer_image" / "lora_trainer" / "sample_data"


def can_mount_tmpfs() -> bool:
    """Whether a test may mount a small tmpfs (a disk that fills up) in a private mount namespace: root."""
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


def sd_config(tmp_path: Path, bucket: str | None, **overrides) -> dict:
    """A tiny text-to-image run on the bundled images, reading and writing S3 when `bucket` is given."""
    config = {
        "base_model": "preset:tiny-sd",
        "resolution": 16,
        "lora_rank": 4,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "seed": 7,
        "max_train_steps": 6,
        "save_steps": 2,
        "metrics_port": 0,
        "train_data_dir": f"s3://{bucket}/datasets/shapes" if bucket else str(SAMPLE / "images"),
        "output_dir": f"s3://{bucket}/runs/shapes" if bucket else str(tmp_path / "out"),
        "s3_cache_dir": str(tmp_path / "cache"),
        "termination_message_path": str(tmp_path / "termination-log"),
    }
    return {**config, **overrides}


def write_config(tmp_path: Path, config: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def termination_message(config: dict) -> dict:
    text = Path(config["termination_message_path"]).read_text()
    assert text.endswith("\n") and text.count("\n") == 1, text
    return json.loads(text)


def upload_folder(client, bucket: str, prefix: str, folder: Path) -> list[str]:
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    return keys


def list_keys(client, bucket: str, prefix: str) -> set[str]:
    """Keys under prefix/, relative to it."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    return {o["Key"][len(prefix.rstrip("/")) + 1 :] for page in pages for o in page.get("Contents", [])}


def get_bytes(client, uri: str) -> bytes:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def files_under(folder: Path) -> set[str]:
    """Relative paths of the non-hidden files under folder (what a run produced locally)."""
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


class TrainerProcess:
    """`python -m lora_trainer.cli --config cfg.yaml` as a real process, its log in a file."""

    def __init__(self, tmp_path: Path, config: dict, env: dict, name: str = "run"):
        self.config_path = write_config(tmp_path, config, f"{name}.yaml")
        self.log_path = tmp_path / f"{name}.log"
        self.log = self.log_path.open("w")
        # one intra-op thread: on a small shared machine, spinning OpenMP threads of parallel runs starve each other
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lora_trainer.cli", "--config", str(self.config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(REPO),
        )

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for_output(self, text: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {text!r}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout}s:\n{self.output()[-3000:]}"
            time.sleep(0.1)

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- hostile keys
class ListingRewriter(ThreadingHTTPServer):
    """A pass-through proxy to SeaweedFS that rewrites placeholders in its answers (REWRITES): `DOTDOT` turns
    into `..`, `BACKSLASH` into `\\`, `LONGSEGMENT` into 300 x's. So listings show keys AWS S3 stores but
    SeaweedFS refuses to. Requests are forwarded unchanged (the Host header too, so signatures still verify)."""

    REWRITES = {b"DOTDOT": b"..", b"BACKSLASH": b"\\", b"LONGSEGMENT": b"x" * 300}

    def __init__(self, upstream: str):
        self.upstream = upstream.split("://", 1)[1]
        super().__init__(("127.0.0.1", 0), _Forward)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=30)
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
        response = upstream.getresponse()
        data = response.read()
        for placeholder, text in ListingRewriter.REWRITES.items():
            data = data.replace(placeholder, text)
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args):
        pass
