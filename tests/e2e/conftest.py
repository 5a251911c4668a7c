"""End-to-end fixtures: the CRD, the operator's RBAC, the operator itself (under its ServiceAccount),
and a namespace with S3 credentials and the bundled sample data in a fresh bucket."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import yaml

from tests.cluster import plugin
from tests.e2e import operator_env as env


@pytest.fixture(scope="session")
def lora_crd(kube_cluster):
    env.install_crd(kube_cluster)


@pytest.fixture(scope="session")
def operator_kubeconfig(kube_cluster, lora_crd, tmp_path_factory):
    """A kubeconfig of the lora-operator ServiceAccount, bound only to deploy/rbac.yaml."""
    env.install_rbac(kube_cluster)
    return env.service_account_kubeconfig(kube_cluster, tmp_path_factory.mktemp("operator") / "sa.kubeconfig")


@pytest.fixture(scope="session")
def operator(kube_cluster, node_agent, s3_server, operator_kubeconfig, tmp_path_factory):
    """lora-operator, running and leading; restarted after a test that stopped it."""
    op = env.OperatorProcess(
        operator_kubeconfig,
        tmp_path_factory.mktemp("operator-run"),
        env={
            "LORA_OPERATOR_S3_ENDPOINT": s3_server.endpoint_url,
            "LORA_OPERATOR_S3_REGION": s3_server.region,
            "LORA_OPERATOR_S3_CREDENTIALS_SECRET": env.S3_SECRET,
            # a half-scheduled multi-node group is released after 5 s (not 5 min) and retried after 60 s
            "LORA_OPERATOR_GROUP_SCHEDULING_TIMEOUT": "5",
            "LORA_OPERATOR_GROUP_RETRY_SECONDS": "60",
        },
    )
    op.repair = op.ensure_running
    op.start()
    plugin._running.append(op)  # log tails in failure reports, restarted between tests
    try:
        yield op
    finally:
        plugin._running.remove(op)
        op.stop()


@dataclass
class Jobs:
    """kubectl, as a user drives LoRATrainingJobs in one namespace."""

    cluster: object
    namespace: str
    bucket: str
    s3: object

    def kubectl(self, *args, **kwargs):
        return self.cluster.kubectl("-n", self.namespace, *args, **kwargs)

    def apply(self, manifest, check=True):
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest), check=check)

    def get(self, name, kind="ltj"):
        out = self.kubectl("get", kind, name, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def status(self, name):
        return (self.get(name) or {}).get("status") or {}

    def wait(self, name, predicate, timeout, what):
        return env.wait_until(
            lambda: (lambda s: s if predicate(s) else None)(self.status(name)),
            timeout,
            f"{self.namespace}/{name}: {what}",
        )

    def wait_phase(self, name, phase, timeout=300, reason=None):
        return self.wait(
            name,
            lambda s: s.get("phase") == phase and (reason is None or s.get("reason") == reason),
            timeout,
            f"phase {phase}" + (f"/{reason}" if reason else ""),
        )

    def wait_condition(self, name, condition, timeout=300):
        """`kubectl wait --for=condition=...`, as a CI pipeline would."""
        return self.kubectl(
            "wait",
            f"--for=condition={condition}",
            f"ltj/{name}",
            f"--timeout={timeout}s",
            timeout=timeout + 30,
            check=False,
        )

    def pods(self, name):
        out = self.kubectl("get", "pods", "-l", f"lora-operator.io/job-name={name}", "-o", "json")
        return sorted(json.loads(out.stdout)["items"], key=lambda p: p["metadata"]["creationTimestamp"])

    def running_pod(self, name):
        for pod in reversed(self.pods(name)):
            states = pod.get("status", {}).get("containerStatuses") or []
            running = pod["status"].get("phase") == "Running" and states and "running" in states[0]["state"]
            if running and not pod["metadata"].get("deletionTimestamp"):
                return pod
        return None

    def events(self, name):
        out = self.kubectl(
            "get",
            "events",
            "--field-selector",
            f"involvedObject.kind=LoRATrainingJob,involvedObject.name={name}",
            "-o",
            "json",
        )
        return json.loads(out.stdout)["items"]

    def s3_keys(self, prefix):
        client = self.s3.client()
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def s3_bytes(self, uri):
        bucket, _, key = uri[len("s3://") :].partition("/")
        return self.s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture
def jobs(kube_cluster, operator, namespace, s3_server, s3_bucket):
    """A namespace with the operator's default S3 Secret and the sample data under s3://<bucket>/data/."""
    env.create_s3_secret(kube_cluster, namespace, s3_server)
    env.upload_sample_data(s3_server.client(), s3_bucket)
    return Jobs(kube_cluster, namespace, s3_bucket, s3_server)
