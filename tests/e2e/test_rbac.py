"""deploy/rbac.yaml grants exactly what the operator needs (every other e2e test runs the operator under it)
and nothing more: asked of the real apiserver's RBAC authorizer with `kubectl auth can-i --as`."""

import pytest

pytestmark = pytest.mark.e2e

SA = "system:serviceaccount:lora-system:lora-operator"

ALLOWED = [
    ("get", "loratrainingjobs.lora-operator.io"),
    ("list", "loratrainingjobs.lora-operator.io"),
    ("watch", "loratrainingjobs.lora-operator.io"),
    ("patch", "loratrainingjobs.lora-operator.io"),
    ("patch", "loratrainingjobs.lora-operator.io --subresource=status"),
    ("update", "loratrainingjobs.lora-operator.io --subresource=finalizers"),
    ("create", "jobs.batch"),
    ("patch", "jobs.batch"),
    ("delete", "jobs.batch"),
    ("watch", "jobs.batch"),
    ("create", "configmaps"),
    ("patch", "configmaps"),
    ("get", "services"),
    ("create", "services"),
    ("patch", "services"),
    ("list", "pods"),
    ("watch", "pods"),
    ("create", "events"),
]
DENIED = [
    ("get", "secrets"),
    ("list", "secrets"),
    ("create", "pods"),
    ("delete", "pods"),
    ("create", "pods --subresource=exec"),
    ("create", "pods --subresource=eviction"),
    ("update", "loratrainingjobs.lora-operator.io --subresource=status"),
    ("delete", "loratrainingjobs.lora-operator.io"),
    ("create", "loratrainingjobs.lora-operator.io"),
    ("update", "loratrainingjobs.lora-operator.io"),
    ("delete", "configmaps"),
    ("list", "configmaps"),
    ("delete", "services"),
    ("update", "services"),
    ("update", "jobs.batch"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("list", "namespaces"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("list", "nodes"),
    ("create", "leases.coordination.k8s.io"),  # only in its own namespace (below)
]


def can_i(cluster, verb, resource, namespace):
    out = cluster.kubectl("auth", "can-i", verb, *resource.split(), "-n", namespace, f"--as={SA}", check=False)
    return out.stdout.strip() == "yes"


@pytest.mark.parametrize("verb,resource", ALLOWED, ids=[f"{v}-{r}" for v, r in ALLOWED])
def test_allowed(kube_cluster, operator_kubeconfig, namespace, verb, resource):
    assert can_i(kube_cluster, verb, resource, namespace)


@pytest.mark.parametrize("verb,resource", DENIED, ids=[f"{v}-{r}" for v, r in DENIED])
def test_denied(kube_cluster, operator_kubeconfig, namespace, verb, resource):
    assert not can_i(kube_cluster, verb, resource, namespace)


def test_leases_only_in_its_own_namespace(kube_cluster, operator_kubeconfig):
    for verb in ("get", "create", "update"):
        assert can_i(kube_cluster, verb, "leases.coordination.k8s.io", "lora-system")
    assert not can_i(kube_cluster, "delete", "leases.coordination.k8s.io", "lora-system")
    assert not can_i(kube_cluster, "update", "leases.coordination.k8s.io", "kube-node-lease")
