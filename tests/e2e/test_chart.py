"""The Helm chart on the real apiserver: `helm template | kubectl apply --dry-run=server`, then an install
whose operator runs as a pod (the node agent maps the operator image to `lora-operator`) under the
chart's own ServiceAccount and RBAC, and trains a job."""

import subprocess

import pytest
import yaml

from tests.e2e import operator_env as env
from tests.unit.test_operator_chart import ALL_ON, CHART, HELM

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(HELM is None, reason="no helm binary (tests/tools/build-helm.sh)")]


def helm_template(namespace, *sets, include_crds=False):
    argv = [HELM, "template", "lora", str(CHART), "--namespace", namespace, "--kube-version", "1.34.4"]
    if include_crds:
        argv.append("--include-crds")
    for item in sets:
        argv += ["--set", item]
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


def without_kinds(text, kinds):
    return yaml.safe_dump_all([d for d in yaml.safe_load_all(text) if d and d["kind"] not in kinds])


def test_chart_applies_to_the_apiserver(kube_cluster, lora_crd, namespace):
    # ServiceMonitor and PodMonitor need the Prometheus Operator's CRDs, which this cluster does not have.
    rendered = without_kinds(helm_template(namespace, *ALL_ON, include_crds=True), {"ServiceMonitor", "PodMonitor"})
    out = kube_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered)
    for kind in (
        "customresourcedefinition",
        "serviceaccount",
        "clusterrole",
        "clusterrolebinding",
        "role",
        "rolebinding",
        "service",
        "deployment",
        "configmap",
        "poddisruptionbudget",
    ):
        assert f"{kind}." in out.stdout or f"{kind}/" in out.stdout, out.stdout


def test_chart_installed_operator_trains_a_job(
    kube_cluster, node_agent, operator, s3_server, s3_bucket, namespace, tmp_path
):
    """The chart's Deployment runs the operator as a pod with only the chart's RBAC (namespaced mode)."""
    release_ns = f"{namespace}-sys"
    kube_cluster.kubectl("create", "namespace", release_ns)
    env.create_s3_secret(kube_cluster, namespace, s3_server)
    env.upload_sample_data(s3_server.client(), s3_bucket)
    rendered = helm_template(
        release_ns,
        "image.tag=e2e",
        f"watchNamespaces={{{namespace}}}",
        f"trainer.image={env.TRAINER_IMAGE}",
        f"s3.endpoint={s3_server.endpoint_url}",
        f"s3.region={s3_server.region}",
        f"s3.credentialsSecret={env.S3_SECRET}",
        "pollInterval=1",
        "leaderElection.leaseDuration=6",
        "httpPort=18181",
        "trainer.terminationGracePeriodSeconds=60",
    )
    (tmp_path / "chart.yaml").write_text(rendered)
    operator.stop()  # the session's operator serves every namespace; the chart's takes this one
    try:
        kube_cluster.kubectl("apply", "-f", tmp_path / "chart.yaml")  # objects name their namespaces
        kube_cluster.kubectl(
            "rollout", "status", "deployment/lora-lora-operator", "-n", release_ns, "--timeout=120s", timeout=150
        )
        jobs_kubectl = lambda *a, **k: kube_cluster.kubectl("-n", namespace, *a, **k)  # noqa: E731
        body = env.llm_manifest("charted", s3_bucket, steps=2, save_steps=2)
        jobs_kubectl("apply", "-f", "-", input=yaml.safe_dump(body))
        waited = jobs_kubectl(
            "wait", "--for=condition=Succeeded", "ltj/charted", "--timeout=400s", timeout=430, check=False
        )
        logs = kube_cluster.kubectl("logs", "-n", release_ns, "deployment/lora-lora-operator", check=False).stdout
        assert waited.returncode == 0, f"{waited.stderr}\noperator log:\n{logs[-3000:]}"
        assert "acquired the leader lease" in logs and "charted" in logs
        lease = kube_cluster.kubectl(
            "get", "lease", "lora-lora-operator", "-n", release_ns, "-o", "jsonpath={.spec.holderIdentity}"
        ).stdout
        assert lease.startswith("lora-lora-operator-")  # POD_NAME from the Deployment
    finally:
        kube_cluster.kubectl(
            "delete", "-f", tmp_path / "chart.yaml", "--wait=true", "--timeout=60s", check=False, timeout=90
        )
        operator.ensure_running()
