"""pytest fixtures for the real test environment (registered by tests/conftest.py).

Nothing starts unless a test asks for a fixture; tests/unit uses none of them. Session fixtures:
  kube_cluster   controlplane.KubeCluster: .server, .kubeconfig, .bin_dir, .logs, .api, .kubectl()
  node_agent     node_agent.NodeAgent on kube_cluster: .evict(), .crash(), .recover(), .pod_ip(),
                 .container_log(); override `node_agent_options` (a session fixture returning
                 NodeAgent keyword arguments) in a conftest to change allocatable, labels, taints...
                 It is also the cluster's scheduler, over every node.
  s3_server      s3.SeaweedS3: .endpoint_url, .access_key, .secret_key, .client(), .env(), .stop(), .start()
  pushgateway    prometheus.Pushgateway: .url, .address
  prometheus     prometheus.Prometheus: .url, .query(), .wait_for(), .set_targets()
Module fixtures:
  second_node    a second NodeAgent (local-node-2, pod IPs 127.0.2.x, the same options) for the tests of
                 a module: two nodes, so one can crash while the other runs; removed after the module
Function fixtures:
  namespace      a fresh namespace (its `default` ServiceAccount exists), deleted afterwards
  s3_bucket      a fresh, empty bucket name on s3_server, deleted afterwards

When a test fails, the tail of every running service's log is added to its report. After each
test a crashed node is recovered and a stopped S3 server restarted, so one test cannot break the next.
"""

import random
import re
import uuid

import pytest

from tests.cluster.kubeapi import ApiError
from tests.cluster.procs import wait_until

_running = []  # started services (anything with log_tails()), for failure reports and repairs


def unique_name(text, prefix="t", max_len=40):
    """A DNS-1123 label (and valid bucket name) derived from a test name, with a random suffix."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[: max_len - len(prefix) - 9].strip("-")
    return f"{prefix}-{base}-{uuid.uuid4().hex[:6]}" if base else f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for service in _running:
            for name, text in service.log_tails().items():
                report.sections.append((f"{name} log (last lines)", text or "(empty)"))


def pytest_runtest_teardown(item):
    for service in _running:
        repair = getattr(service, "repair", None)
        if repair is not None:
            repair()


def _session_service(service, start_kwargs=None):
    """Start `service`, yield it, stop it; tracked for failure reports meanwhile."""
    service.start(**(start_kwargs or {}))
    _running.append(service)
    try:
        yield service
    finally:
        _running.remove(service)
        service.stop()


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory):
    """etcd + kube-apiserver + kube-controller-manager on 127.0.0.1 (binaries: tests/controlplane/build.sh
    or $LORA_CONTROLPLANE_BIN). Logs in kube_cluster.logs."""
    from tests.cluster.controlplane import KubeCluster

    yield from _session_service(KubeCluster(tmp_path_factory.mktemp("kube")))


# This session's pod addresses: a /16 of 127/8 of its own, so two sessions on one machine (two engineers, two
# CI jobs) never hand out the same pod IP, nor scrape each other's trainers at it.
SESSION_NET = f"127.{random.SystemRandom().randint(16, 254)}"


@pytest.fixture(scope="session")
def node_agent_options():
    """Keyword arguments for NodeAgent; override in a conftest.py (session scope) to change the node."""
    return {"allocatable": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2"}, "ip_prefix": f"{SESSION_NET}.0"}


@pytest.fixture(scope="session")
def node_agent(kube_cluster, node_agent_options, tmp_path_factory):
    """The one node of kube_cluster: schedules pods and runs their containers as local processes."""
    from tests.cluster.node_agent import NodeAgent

    agent = NodeAgent(kube_cluster.api, kube_cluster.pki, tmp_path_factory.mktemp("node"), **node_agent_options)
    yield from _session_service(agent)


@pytest.fixture(scope="module")
def second_node(kube_cluster, node_agent, node_agent_options, tmp_path_factory):
    """A second node for the tests of one module (node_agent schedules onto both); afterwards its pods are
    killed and the Node removed, so later tests see one node again."""
    from tests.cluster.node_agent import NodeAgent

    options = {**node_agent_options, "name": "local-node-2", "ip_prefix": f"{SESSION_NET}.2", "schedule": False}
    agent = NodeAgent(kube_cluster.api, kube_cluster.pki, tmp_path_factory.mktemp("node2"), **options)
    agent.start()
    _running.append(agent)
    try:
        yield agent
    finally:
        _running.remove(agent)
        agent.stop()
        agent.delete_node()


@pytest.fixture
def namespace(kube_cluster, request):
    """A fresh namespace name; deleted (with everything in it) after the test."""
    name = unique_name(request.node.name, "t", 50)
    api = kube_cluster.api
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait_until(
        lambda: api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"), 30, f"ServiceAccount default in {name}"
    )
    yield name
    try:
        api.delete(f"/api/v1/namespaces/{name}")
    except ApiError as e:
        if e.status != 404:
            raise


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS S3 on 127.0.0.1 with a static key pair; .stop()/.start() keep port and data."""
    from tests.cluster.s3 import SeaweedS3

    yield from _session_service(SeaweedS3(tmp_path_factory.mktemp("s3")))


@pytest.fixture
def s3_bucket(s3_server, request):
    """The name of a fresh bucket on s3_server; emptied and deleted after the test."""
    if not s3_server.running:
        s3_server.start()
    name = unique_name(request.node.name, "b", 50)
    s3_server.client().create_bucket(Bucket=name)
    yield name
    if s3_server.running:
        s3_server.delete_bucket(name)


@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory):
    """Prometheus Pushgateway on 127.0.0.1 (in memory)."""
    from tests.cluster.prometheus import Pushgateway

    yield from _session_service(Pushgateway(tmp_path_factory.mktemp("pushgateway")))


@pytest.fixture(scope="session")
def prometheus(pushgateway, tmp_path_factory):
    """Prometheus on 127.0.0.1 scraping every 1 s: job `pods` (set_targets) and job `pushgateway`."""
    from tests.cluster.prometheus import Prometheus

    yield from _session_service(Prometheus(tmp_path_factory.mktemp("prometheus"), pushgateway.address))
