"""Running lora-operator for end-to-end tests and benchmarks, as a user's cluster would.

The operator runs as a local process (the node agent could run it as a pod too, see test_chart) with a
kubeconfig holding a token of the `lora-operator` ServiceAccount bound ONLY to deploy/rbac.yaml: every
e2e test is also a test of those RBAC rules on the real apiserver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "loratrainingjobs.yaml"
RBAC = REPO / "deploy" / "rbac.yaml"
SAMPLE_DATA = REPO / "trainer_image" / "lora_trainer" / "sample_data"
OPERATOR_NAMESPACE = "lora-system"
S3_SECRET = "s3-credentials"
TRAINER_IMAGE = "ghcr.io/lora-operator/trainer:e2e"


def wait_until(predicate, timeout, what, interval=0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def install_crd(cluster):
    cluster.kubectl("apply", "-f", CRD)
    jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
    wait_until(
        lambda: (
            cluster.kubectl(
                "get", "crd", "loratrainingjobs.lora-operator.io", "-o", f"jsonpath={jsonpath}", check=False
            ).stdout
            == "True"
        ),
        60,
        "the LoRATrainingJob CRD to be established",
    )


def install_rbac(cluster, namespace=OPERATOR_NAMESPACE):
    if cluster.kubectl("get", "namespace", namespace, check=False).returncode != 0:
        cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("apply", "-f", RBAC)


def service_account_kubeconfig(cluster, path, namespace=OPERATOR_NAMESPACE, name="lora-operator"):
    """A kubeconfig that authenticates as the ServiceAccount (a bound token from the TokenRequest API)."""
    token = cluster.kubectl("create", "token", name, "-n", namespace, "--duration=24h").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": admin["clusters"][0]["name"], "user": name}}],
        "current-context": name,
    }
    Path(path).write_text(json.dumps(config))
    return Path(path)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    """`lora-operator` as a subprocess; start/stop/kill/restart, its /metrics and its log."""

    def __init__(self, kubeconfig, workdir, env=None, identity="operator-e2e"):
        self.kubeconfig = Path(kubeconfig)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.identity = identity
        self.extra_env = dict(env or {})
        self.proc = None
        self.starts = 0
        self.log_path = self.workdir / f"{identity}.log"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def environment(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_OPERATOR_")}
        env.update(
            {
                "KUBECONFIG": str(self.kubeconfig),
                "LORA_OPERATOR_HTTP_HOST": "127.0.0.1",
                "LORA_OPERATOR_HTTP_PORT": str(self.port),
                "LORA_OPERATOR_LEASE_NAMESPACE": OPERATOR_NAMESPACE,
                "LORA_OPERATOR_IDENTITY": self.identity,
                "LORA_OPERATOR_TRAINER_IMAGE": TRAINER_IMAGE,
                "LORA_OPERATOR_POLL_INTERVAL": "1",
                "LORA_OPERATOR_LEASE_DURATION": "6",
                "LORA_OPERATOR_TERMINATION_GRACE_SECONDS": "60",
                **self.extra_env,
            }
        )
        return env

    def start(self, wait_ready=True, timeout=90):
        self.starts += 1
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            log.write(f"\n===== start {self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lora_operator.main"],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=90):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"lora-operator exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    return r.status == 200 and self.metric("lora_operator_leader") == 1
            except OSError:  # not listening yet
                return False

        wait_until(ready, timeout, "lora-operator to become ready and lead")

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=30):
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None

    def kill(self):
        if self.running:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def ensure_running(self):
        if not self.running:
            self.start()

    def metrics_text(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name, labels=None):
        """The value of one sample of the operator's /metrics (None if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    return sample.value
        return None

    def log_tail(self, lines=60):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_tails(self, lines=60):
        return {f"lora-operator ({self.identity})": self.log_tail(lines)}


def upload_sample_data(s3_client, bucket, prefix="data"):
    """The bundled images (metadata.csv) and JSONL files, under s3://bucket/<prefix>/{images,text}/."""
    for path in sorted(SAMPLE_DATA.rglob("*")):
        if path.is_file():
            s3_client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(SAMPLE_DATA)}")
    return f"s3://{bucket}/{prefix}"


def create_s3_secret(cluster, namespace, s3_server, name=S3_SECRET):
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        name,
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3_server.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3_server.secret_key}",
    )


def sd_manifest(name, bucket, steps=12, save_steps=4, **spec):
    """A tiny text-to-image job on the bundled images (CPU)."""
    body = {
        "apiVersion": "lora-operator.io/v1alpha1",
        "kind": "LoRATrainingJob",
        "metadata": {"name": name},
        "spec": {
            "task": "text-to-image",
            "baseModel": "preset:tiny-sd",
            "dataset": {"uri": f"s3://{bucket}/data/images", "resolution": 32},
            "training": {"rank": 4, "batchSize": 4, "steps": steps, "learningRate": 1e-3, "seed": 7},
            "output": {"uri": f"s3://{bucket}/out/{name}", "saveSteps": save_steps},
            "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
        },
    }
    return _merge(body, {"spec": spec})


def llm_manifest(name, bucket, steps=8, save_steps=4, **spec):
    """A tiny text-generation job on the bundled JSONL (CPU)."""
    body = {
        "apiVersion": "lora-operator.io/v1alpha1",
        "kind": "LoRATrainingJob",
        "metadata": {"name": name},
        "spec": {
            "task": "text-generation",
            "baseModel": "preset:tiny-llm",
            "dataset": {"uri": f"s3://{bucket}/data/text", "maxSeqLength": 64},
            "training": {"rank": 4, "batchSize": 4, "steps": steps, "learningRate": 1e-3, "seed": 7},
            "output": {"uri": f"s3://{bucket}/out/{name}", "saveSteps": save_steps},
            "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
        },
    }
    return _merge(body, {"spec": spec})


def _merge(base, extra):
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def find_trainer_pids(namespace, pod_name):
    """PIDs of processes whose environment says they are the trainer of `namespace/pod_name`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"POD_NAME={pod_name}".encode() in env
            and f"LORA_JOB_NAMESPACE={namespace}".encode() in env
            and b"lora-train" in cmdline
        ):
            pids.append(int(entry.name))
    return pids


def _proc(pid):
    """(environ entries, cmdline, parent pid) of a process, or None once it is gone."""
    entry = Path("/proc") / str(pid)
    try:
        env = (entry / "environ").read_bytes().split(b"\0")
        cmdline = (entry / "cmdline").read_bytes()
        ppid = int(next(line for line in (entry / "status").read_text().splitlines() if line.startswith("PPid:"))[5:])
    except (OSError, StopIteration, ValueError):
        return None
    return env, cmdline, ppid


# helper processes of multiprocessing, never workers
_HELPERS = (b"resource_tracker", b"semaphore_tracker", b"forkserver")


def find_worker_pids(namespace, pod_name):
    """PIDs of the training worker processes in a trainer pod (not the elastic launcher that started them).

    Workers carry LOCAL_RANK in their environment when the launcher exec'd them; workers it forked or spawned
    in-process do not show later environment changes in /proc, so then they are found as the children of the
    pod's launcher process (descending while a process has a single child that has children of its own)."""
    mine = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _proc(int(entry.name))
            if (
                info
                and f"POD_NAME={pod_name}".encode() in info[0]
                and f"LORA_JOB_NAMESPACE={namespace}".encode() in info[0]
            ):
                mine[int(entry.name)] = info
    ranked = [pid for pid, (env, _, _) in mine.items() if any(e.startswith(b"LOCAL_RANK=") for e in env)]
    if ranked:
        return sorted(ranked)
    children = {
        pid: [c for c, info in mine.items() if info[2] == pid and not any(h in info[1] for h in _HELPERS)]
        for pid in mine
    }
    tops = [pid for pid, info in mine.items() if info[2] not in mine]
    if len(tops) != 1:
        return []
    current = tops[0]
    while len(children[current]) == 1 and children[children[current][0]]:
        current = children[current][0]
    return sorted(children[current])
