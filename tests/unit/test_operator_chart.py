"""The Helm chart and the Dockerfile, without a cluster: structure, documentation, rendering with `helm
template` (when a helm binary exists: tests/tools/build-helm.sh builds one), and hadolint."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lora_operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lora-operator"
TEMPLATES = CHART / "templates"


def find_helm():
    candidates = [
        os.environ.get("LORA_HELM_BIN"),
        shutil.which("helm"),
        *sorted(Path(os.environ.get("LORA_CACHE_DIR", Path.home() / ".cache/lora-operator")).glob("helm/*/helm")),
    ]
    return next((str(c) for c in candidates if c and os.access(c, os.X_OK)), None)


HELM = find_helm()
needs_helm = pytest.mark.skipif(
    HELM is None, reason="no helm binary (run tests/tools/build-helm.sh or set LORA_HELM_BIN)"
)
ALL_ON = [
    "grafana.dashboards.enabled=true",
    "metrics.serviceMonitor.enabled=true",
    "metrics.trainerPodMonitor.enabled=true",
    "podDisruptionBudget.enabled=true",
]


def render(*sets, namespace="lora-system", extra=()):
    argv = [HELM, "template", "lora", str(CHART), "--namespace", namespace, "--kube-version", "1.34.4", *extra]
    for item in sets:
        argv += ["--set", item]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs):
    out = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


# ---------------------------------------------------------------------------------------------
# structure


def test_every_value_is_documented():
    """helm-docs style: each value (a leaf, or a mapping documented as a whole) has a '# --' comment."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).split(" #")[0].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        block, j = [], i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j].strip())
            j -= 1
        documented = any(b.startswith("# --") for b in block) or any(d for _, d in stack)
        following = next((ln for ln in lines[i + 1 :] if ln.strip() and not ln.lstrip().startswith("#")), "")
        deeper = len(following) - len(following.lstrip()) > indent
        is_section = not rest and deeper and not following.lstrip().startswith("- ")
        if not is_section and not documented:
            undocumented.append(f"line {i + 1}: {key}")
        stack.append((indent, documented))
    assert not undocumented, "values without a '# --' comment:\n" + "\n".join(undocumented)


def test_one_object_kind_per_template():
    for path in TEMPLATES.glob("*.yaml"):
        kinds = set(re.findall(r"^kind:\s*(\S+)", path.read_text(), re.M))
        assert len(kinds) == 1, f"{path.name} defines {kinds or 'no object'}"


def test_dashboard_is_valid_json_showing_loss():
    dashboards = list((CHART / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        dash = json.loads(path.read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        assert any(e.startswith("lora_train_loss") for e in exprs)
        assert "Files.Glob" in (TEMPLATES / "grafana-dashboards.yaml").read_text()


def test_optional_pieces_are_gated():
    for name, flag in (
        ("servicemonitor.yaml", ".Values.metrics.serviceMonitor.enabled"),
        ("podmonitor-trainers.yaml", ".Values.metrics.trainerPodMonitor.enabled"),
        ("grafana-dashboards.yaml", ".Values.grafana.dashboards.enabled"),
        ("poddisruptionbudget.yaml", ".Values.podDisruptionBudget.enabled"),
    ):
        assert (TEMPLATES / name).read_text().startswith(f"{{{{- if {flag} }}}}")


def test_chart_crd_is_the_repository_crd():
    assert (CHART / "crds" / "loratrainingjobs.yaml").read_bytes() == (
        REPO / "crds" / "loratrainingjobs.yaml"
    ).read_bytes()


# ---------------------------------------------------------------------------------------------
# rendering


@needs_helm
def test_default_render():
    kinds = by_kind(render())
    assert set(kinds) == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
    }
    (deploy,) = kinds["Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/lora-operator/operator:0.1.0"
    assert (
        pod["securityContext"]["runAsNonRoot"] is True
        and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["serviceAccountName"] == kinds["ServiceAccount"][0]["metadata"]["name"]


@needs_helm
def test_rendered_settings_are_valid_operator_settings():
    (deploy,) = by_kind(
        render(
            "s3.endpoint=http://minio:9000",
            "s3.credentialsSecret=s3",
            "watchNamespaces={a,b}",
            "trainer.serviceAccountName=trainer",
            "clusterDomain=corp.example",
            "groupScheduling.timeout=600",
        )
    )["Deployment"]
    env = {e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    settings = Settings.from_env(env)  # raises on any unknown or invalid LORA_OPERATOR_* variable
    assert settings.watch_namespaces == ("a", "b") and settings.s3_endpoint == "http://minio:9000"
    assert settings.trainer_service_account == "trainer" and settings.lease_name == "lora-lora-operator"
    assert settings.cluster_domain == "corp.example" and settings.group_scheduling_timeout == 600
    assert (settings.group_retry_seconds, settings.group_retry_max_seconds) == (60, 900)


@needs_helm
def test_rbac_matches_deploy_rbac():
    rendered = by_kind(render())["ClusterRole"][0]["rules"]
    reference = next(
        d for d in yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()) if d and d["kind"] == "ClusterRole"
    )["rules"]
    assert rendered == reference
    role = by_kind(render())["Role"][0]["rules"]
    reference_role = next(
        d for d in yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()) if d and d["kind"] == "Role"
    )["rules"]
    assert role == reference_role


@needs_helm
def test_watched_namespaces_get_role_bindings_instead_of_a_cluster_binding():
    kinds = by_kind(render("watchNamespaces={team-a,team-b}"))
    assert "ClusterRoleBinding" not in kinds
    bound = {b["metadata"]["namespace"] for b in kinds["RoleBinding"] if b["roleRef"]["kind"] == "ClusterRole"}
    assert bound == {"team-a", "team-b"}


@needs_helm
def test_everything_enabled_renders_and_ships_the_dashboard():
    kinds = by_kind(render(*ALL_ON))
    for kind in ("ServiceMonitor", "PodMonitor", "PodDisruptionBudget", "ConfigMap"):
        assert kind in kinds
    (dashboards,) = kinds["ConfigMap"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboards["data"]["lora-training.json"])["uid"] == "lora-training"


@needs_helm
def test_helm_lint():
    out = subprocess.run(
        [HELM, "lint", str(CHART), "--kube-version", "1.34.4", "--set", ",".join(ALL_ON)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_has_both_targets_and_passes_hadolint():
    text = (REPO / "Dockerfile").read_text()
    targets = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert {"trainer", "operator"} <= set(targets)
    operator_build = text.split("AS operator-build", 1)[1].split("FROM ", 1)[0]
    assert "--extra operator" in operator_build and "--extra trainer" not in operator_build  # no torch in the operator
    hadolint = shutil.which("hadolint") or str(Path(os.sys.executable).parent / "hadolint")
    out = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for user in re.findall(r"^USER (\S+)$", text, re.M):
        assert not user.startswith("0") and user != "root"
