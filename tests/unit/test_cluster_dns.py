"""What the node agent gives multi-pod jobs (tests/cluster/podspec.py, runtime.py): a scheduler over several
nodes, and pod host names with the records cluster DNS would answer for a headless Service, in /etc/hosts."""

import json

import pytest

from tests.cluster import podspec, procs, runtime


def node(name, cpu="16", memory="64Gi", gpus="2", taints=None):
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"taints": taints or []},
        "status": {"allocatable": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": gpus, "pods": "110"}},
    }


def pending(requests=None, **spec):
    return {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"containers": [{"name": "main", "resources": {"requests": requests or {}}}], **spec},
    }


def used(**by_node):
    return {name: {k: podspec.parse_quantity(v) for k, v in requests.items()} for name, requests in by_node.items()}


UNREACHABLE = {"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule"}

# (id, pod, nodes, used, node chosen, message)
PLACEMENTS = [
    (
        "the-emptier-node",
        pending({"cpu": "1", "memory": "4Gi"}),
        [node("a"), node("b")],
        used(a={"cpu": "4"}),
        "b",
        None,
    ),
    ("ties-by-name", pending({"cpu": "1"}), [node("b"), node("a")], {}, "a", None),
    (
        "only-one-fits",
        pending({"nvidia.com/gpu": "2"}),
        [node("a"), node("b")],
        used(b={"nvidia.com/gpu": "1"}),
        "a",
        None,
    ),
    ("dead-node-is-tainted", pending(), [node("a", taints=[UNREACHABLE]), node("b")], {}, "b", None),
    (
        "none-fits-one-reason",
        pending({"memory": "40Gi"}),
        [node("a"), node("b")],
        used(a={"memory": "40Gi"}, b={"memory": "40Gi"}),
        None,
        "0/2 nodes are available: 2 Insufficient memory.",
    ),
    (
        "none-fits-reasons-counted-and-sorted",
        pending({"memory": "40Gi"}),
        [node("a"), node("b", taints=[UNREACHABLE]), node("c")],
        used(a={"memory": "40Gi"}, c={"memory": "40Gi"}),
        None,
        "0/3 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/unreachable: }, "
        "2 Insufficient memory.",
    ),
    (
        "one-node-as-before",
        pending({"nvidia.com/gpu": "3"}),
        [node("local-node")],
        {},
        None,
        "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
    ),
]


@pytest.mark.parametrize("name,the_pod,nodes,usage,chosen,message", PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
def test_choose_node(name, the_pod, nodes, usage, chosen, message):
    assert podspec.choose_node(the_pod, nodes, usage) == (chosen, message)


def test_two_equal_pods_spread_over_two_nodes():
    nodes, usage = [node("a"), node("b")], {}
    placed = []
    for _ in range(2):
        the_pod = pending({"cpu": "1", "memory": "20Gi"})
        chosen, _ = podspec.choose_node(the_pod, nodes, usage)
        podspec.add_requests(usage.setdefault(chosen, {}), podspec.pod_requests(the_pod["spec"]))
        placed.append(chosen)
    assert placed == ["a", "b"]


def test_fit_error_matches_the_single_node_message():
    reasons = ["Insufficient cpu", "Insufficient memory"]
    assert podspec.fit_error({"local-node": reasons}) == podspec.unschedulable_message(reasons)


# -- host names and DNS records


def worker(index, ip=None, phase="Running", ready=True, subdomain="w", deleting=False, labels=None, created=None):
    meta = {
        "name": f"job-{index}-abcde",
        "namespace": "ns",
        "uid": f"uid-{index}",
        "labels": {"app": "train"} if labels is None else labels,
        "creationTimestamp": created or f"2026-01-01T00:00:0{index}Z",
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    status = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    spec = {"hostname": f"job-{index}", "subdomain": subdomain} if subdomain else {}
    return {"metadata": meta, "spec": spec, "status": status}


def service(name="w", namespace="ns", headless=True, not_ready=True, selector=None):
    spec = {"selector": {"app": "train"} if selector is None else selector, "publishNotReadyAddresses": not_ready}
    spec["clusterIP"] = "None" if headless else "10.0.0.7"
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def test_pod_hostname_is_spec_hostname_else_the_pod_name():
    assert podspec.pod_hostname(worker(0)) == "job-0"
    assert podspec.pod_hostname({"metadata": {"name": "x" * 70 + "-y"}, "spec": {}}) == "x" * 63


def test_dns_names_fqdn_first_then_what_the_search_path_completes():
    assert podspec.dns_names("job-1", "w", "ns", "cluster.local") == [
        "job-1.w.ns.svc.cluster.local",
        "job-1.w.ns.svc",
        "job-1.w.ns",
        "job-1.w",
    ]


# (id, pods, services, records as (ip, first name))
RECORDS = [
    (
        "published",
        [worker(0, "127.0.0.10"), worker(1, "127.0.2.10")],
        [service()],
        [
            ("127.0.0.10", "job-0.w.ns.svc.cluster.local"),
            ("127.0.2.10", "job-1.w.ns.svc.cluster.local"),
        ],
    ),
    ("no-service-no-records", [worker(0, "127.0.0.10")], [], []),
    ("service-with-a-cluster-ip", [worker(0, "127.0.0.10")], [service(headless=False)], []),
    ("service-in-another-namespace", [worker(0, "127.0.0.10")], [service(namespace="other")], []),
    ("not-selected", [worker(0, "127.0.0.10", labels={"app": "other"})], [service()], []),
    ("no-ip-yet", [worker(0)], [service()], []),
    ("finished-pods-leave", [worker(0, "127.0.0.10", phase="Failed")], [service()], []),
    (
        "not-ready-published-on-request",
        [worker(0, "127.0.0.10", ready=False)],
        [service()],
        [("127.0.0.10", "job-0.w.ns.svc.cluster.local")],
    ),
    ("not-ready-hidden-otherwise", [worker(0, "127.0.0.10", ready=False)], [service(not_ready=False)], []),
    ("terminating-hidden-otherwise", [worker(0, "127.0.0.10", deleting=True)], [service(not_ready=False)], []),
    (
        "a-replacement-takes-the-name",
        [
            worker(1, "127.0.0.11", created="2026-01-01T00:00:01Z"),
            worker(1, "127.0.0.12", created="2026-01-01T00:05:00Z"),
        ],
        [service()],
        [("127.0.0.12", "job-1.w.ns.svc.cluster.local")],
    ),
]


@pytest.mark.parametrize("name,pods,services,records", RECORDS, ids=[r[0] for r in RECORDS])
def test_pod_dns_records(name, pods, services, records):
    found = podspec.pod_dns_records(pods, services, "ns", "w", "cluster.local")
    assert [(ip, names[0]) for ip, names in found] == records


def test_hosts_file_resolves_the_pod_and_its_siblings_in_every_form():
    me, sibling = worker(0, "127.0.0.10"), worker(1)
    text = podspec.hosts_file(me, "127.0.0.10", [me, sibling], [service()], ips={"uid-1": "127.0.2.10"})
    lines = text.splitlines()
    assert lines[0] == "# Kubernetes-managed hosts file." and "127.0.0.1\tlocalhost" in lines
    assert "127.0.0.10\tjob-0.w.ns.svc.cluster.local\tjob-0" in lines  # the kubelet's own line, FQDN first
    sibling_line = next(line for line in lines if line.startswith("127.0.2.10\t"))
    assert sibling_line.split("\t")[1:] == podspec.dns_names("job-1", "w", "ns", "cluster.local")


def test_hosts_file_of_a_plain_pod_and_host_aliases():
    plain = {
        "metadata": {"name": "web", "namespace": "ns"},
        "spec": {"hostAliases": [{"ip": "10.1.2.3", "hostnames": ["foo.local", "bar.local"]}]},
    }
    lines = podspec.hosts_file(plain, "127.0.0.20").splitlines()
    assert "127.0.0.20\tweb" in lines and "10.1.2.3\tfoo.local\tbar.local" in lines
    assert not any("Cluster DNS" in line for line in lines)


# -- the runtime: /etc/hosts mounted, kept current in place, the host name set by the launcher


def test_container_mounts_add_the_pods_hosts_file(tmp_path):
    term, hosts = tmp_path / "term", tmp_path / "etc-hosts"
    term.write_text(""), hosts.write_text("")
    container = {"terminationMessagePath": str(tmp_path / "termination-log")}
    mounts = runtime.container_mounts(container, {}, term, [], hosts_file=hosts)
    assert (str(hosts), "/etc/hosts", False) in mounts
    assert not any(t == "/etc/hosts" for _, t, _ in runtime.container_mounts(container, {}, term, []))


def test_write_in_place_keeps_the_inode(tmp_path):
    path = tmp_path / "hosts"
    assert runtime.write_in_place(path, "a long first version\n") is True
    inode = path.stat().st_ino
    assert runtime.write_in_place(path, "short\n") is True
    assert path.read_text() == "short\n" and path.stat().st_ino == inode
    assert runtime.write_in_place(path, "short\n") is False


def test_launcher_gets_the_host_name_only_when_there_is_one():
    spec = json.loads(procs.launcher_argv(["true"], hostname="job-0")[2])
    assert spec["hostname"] == "job-0"
    assert "hostname" not in json.loads(procs.launcher_argv(["true"])[2])
