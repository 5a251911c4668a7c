"""The node agent's pure rules (tests/cluster/podspec.py): no cluster, no processes."""

from fractions import Fraction

import pytest

from tests.cluster import podspec
from tests.cluster.podspec import ConfigError


@pytest.mark.parametrize(
    "text, value",
    [
        ("100m", Fraction(1, 10)),
        ("2", 2),
        (3, 3),
        ("1.5", Fraction(3, 2)),
        ("64Gi", 64 * 2**30),
        ("500M", 500 * 10**6),
        ("1e3", 1000),
        ("1E", 10**18),
        ("128Ki", 131072),
        ("0.5Gi", 2**29),
    ],
)
def test_parse_quantity(text, value):
    assert podspec.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1Q", "--1", "1.2.3"])
def test_parse_quantity_rejects_garbage(text):
    with pytest.raises(ValueError):
        podspec.parse_quantity(text)


def test_pod_requests_sum_containers_default_to_limits_and_cover_init_containers():
    spec = {
        "containers": [
            {"resources": {"requests": {"cpu": "500m"}, "limits": {"cpu": "2", "nvidia.com/gpu": "1"}}},
            {"resources": {"requests": {"cpu": "250m", "memory": "1Gi"}}},
        ],
        "initContainers": [{"resources": {"requests": {"memory": "3Gi", "cpu": "100m"}}}],
    }
    assert podspec.pod_requests(spec) == {"cpu": Fraction(3, 4), "memory": 3 * 2**30, "nvidia.com/gpu": 1, "pods": 1}


NODE = {
    "metadata": {"name": "local-node", "labels": {"kubernetes.io/hostname": "local-node", "gpu": "a100"}},
    "spec": {},
    "status": {"allocatable": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2", "pods": "110"}},
}


def pod(requests=None, **spec):
    return {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"containers": [{"name": "main", "resources": {"requests": requests or {}}}], **spec},
    }


@pytest.mark.parametrize(
    "the_pod, used, reasons",
    [
        (pod({"nvidia.com/gpu": "2"}), {}, []),
        (pod({"nvidia.com/gpu": "3"}), {}, ["Insufficient nvidia.com/gpu"]),
        (pod({"nvidia.com/gpu": "1"}), {"nvidia.com/gpu": 2}, ["Insufficient nvidia.com/gpu"]),
        (pod({"cpu": "20", "memory": "100Gi"}), {}, ["Insufficient cpu", "Insufficient memory"]),
        (pod({"example.com/fpga": "1"}), {}, ["Insufficient example.com/fpga"]),
        (pod(nodeSelector={"gpu": "a100"}), {}, []),
        (pod(nodeSelector={"gpu": "h100"}), {}, ["node(s) didn't match Node selector"]),
        (pod(), {"pods": 110}, ["Too many pods"]),
    ],
    ids=["fits", "gpu", "gpu-used", "cpu+memory", "unknown-resource", "selector", "selector-miss", "pods"],
)
def test_unschedulable_reasons(the_pod, used, reasons):
    assert podspec.unschedulable_reasons(the_pod, NODE, {k: Fraction(v) for k, v in used.items()}) == reasons


def test_message_matches_kube_scheduler_wording():
    assert (
        podspec.unschedulable_message(["Insufficient nvidia.com/gpu"])
        == "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    )


TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    "toleration, ok",
    [
        ({"key": "nvidia.com/gpu", "operator": "Exists"}, True),
        ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}, True),
        ({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}, True),
        ({"key": "nvidia.com/gpu", "value": "absent"}, False),
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}, False),
        ({"operator": "Exists"}, True),
        ({"key": "other", "operator": "Exists"}, False),
    ],
)
def test_tolerations(toleration, ok):
    assert podspec.tolerates(toleration, TAINT) is ok


def test_untolerated_taint_blocks_scheduling_with_its_name():
    node = {**NODE, "spec": {"taints": [TAINT, {"key": "soft", "effect": "PreferNoSchedule"}]}}
    assert podspec.unschedulable_reasons(pod(), node, {}) == ["node(s) had untolerated taint {nvidia.com/gpu: present}"]
    tolerated = pod(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])
    assert podspec.unschedulable_reasons(tolerated, node, {}) == []


def test_unschedulable_node():
    node = {**NODE, "spec": {"unschedulable": True}}
    assert podspec.unschedulable_reasons(pod(), node, {}) == ["node(s) were unschedulable"]


@pytest.mark.parametrize(
    "terms, ok",
    [
        ([{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100", "h100"]}]}], True),
        ([{"matchExpressions": [{"key": "gpu", "operator": "NotIn", "values": ["a100"]}]}], False),
        (
            [
                {"matchExpressions": [{"key": "zone", "operator": "Exists"}]},
                {"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]},
            ],
            True,
        ),
        ([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["other"]}]}], False),
    ],
)
def test_required_node_affinity(terms, ok):
    spec = {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}
    }
    assert podspec.matches_node_selector(spec, NODE) is ok


@pytest.mark.parametrize(
    "image, entrypoint",
    [
        ("ghcr.io/acme/lora-operator-trainer:0.1.0", ["lora-train"]),
        ("lora-operator/trainer:dev", ["lora-train"]),
        ("ghcr.io/acme/lora-operator:0.1.0", ["lora-operator"]),
        ("python:3.12-slim", ["python"]),
        ("docker.io/library/python:3.11", ["python"]),
        ("busybox:1.36", ["sh"]),
        ("nvidia/cuda:12.4.0-runtime", None),
        ("pythonista:1", None),
    ],
)
def test_image_entrypoint(image, entrypoint):
    assert podspec.image_entrypoint(image) == entrypoint


@pytest.mark.parametrize(
    "container, argv",
    [
        ({"command": ["python", "-c", "x"]}, ["python", "-c", "x"]),
        ({"args": ["--config", "/etc/lora/train.yaml"]}, ["lora-train", "--config", "/etc/lora/train.yaml"]),
        ({}, ["lora-train"]),
        (
            {"command": ["echo"], "args": ["$(NAME)", "$$(NAME)", "$(MISSING)"]},
            ["echo", "job", "$(NAME)", "$(MISSING)"],
        ),
    ],
)
def test_container_argv(container, argv):
    assert podspec.container_argv(container, ["lora-train"], {"NAME": "job"}) == argv


SOURCES = {
    ("ConfigMap", "ns", "cfg"): {"greeting": "hello", "bad key": "x", "LEVEL": "debug"},
    ("Secret", "ns", "creds"): {"key": "s3cr3t"},
}


def lookup(kind, namespace, name):
    return SOURCES.get((kind, namespace, name))


POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "lora"}},
    "spec": {"nodeName": "local-node", "serviceAccountName": "default"},
}


def test_container_env_resolves_every_source_in_kubelet_order():
    container = {
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}, {"secretRef": {"name": "creds"}}],
        "env": [
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "URL", "value": "http://$(POD_IP):9090"},
            {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "MISSING", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}},
        ],
        "resources": {"limits": {"cpu": "1500m"}},
    }
    env = podspec.container_env(POD, container, lookup, "127.0.0.12", base={"PATH": "/bin", "GREETING": "base"})
    assert env == {
        "PATH": "/bin",
        "CFG_greeting": "hello",
        "CFG_LEVEL": "debug",
        "key": "s3cr3t",
        "GREETING": "hello",
        "PASSWORD": "s3cr3t",
        "POD_NAME": "p",
        "POD_NAMESPACE": "ns",
        "POD_IP": "127.0.0.12",
        "APP": "lora",
        "URL": "http://127.0.0.12:9090",
        "CPUS": "2",
    }


@pytest.mark.parametrize(
    "var, message",
    [
        ({"secretKeyRef": {"name": "nope", "key": "k"}}, 'secret "nope" not found'),
        ({"configMapKeyRef": {"name": "cfg", "key": "absent"}}, "couldn't find key absent in ConfigMap ns/cfg"),
        ({"fieldRef": {"fieldPath": "spec.bogus"}}, "unsupported fieldRef 'spec.bogus'"),
    ],
)
def test_container_env_errors_like_the_kubelet(var, message):
    with pytest.raises(ConfigError, match=message):
        podspec.container_env(POD, {"env": [{"name": "X", "valueFrom": var}]}, lookup, "127.0.0.12")


def running():
    return {"state": {"running": {}}}


def exited(code):
    return {"state": {"terminated": {"exitCode": code}}}


def backing_off(code):
    return {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"exitCode": code}}}


def creating():
    return {"state": {"waiting": {"reason": "ContainerCreating"}}}


@pytest.mark.parametrize(
    "policy, statuses, phase",
    [
        ("Never", [creating()], "Pending"),
        ("Never", [running()], "Running"),
        ("Never", [exited(0)], "Succeeded"),
        ("Never", [exited(1)], "Failed"),
        ("Never", [exited(0), running()], "Running"),
        ("Never", [exited(0), exited(2)], "Failed"),
        ("OnFailure", [backing_off(1)], "Running"),
        ("OnFailure", [exited(0)], "Succeeded"),
        ("Always", [backing_off(0)], "Running"),
        ("Always", [exited(0)], "Running"),
    ],
)
def test_pod_phase(policy, statuses, phase):
    assert podspec.pod_phase(policy, statuses) == phase
