"""Training on several nodes (issue 13): two agent nodes, the pods of an Indexed Job, their DNS names, the group's
restarts and its gang scheduling, from `kubectl apply` to the same weights a single process trains.

The cluster tests (DNS, a dead node's pods replaced) need no trainer; the training tests need the trainer's
distributed side (LORA_NNODES and friends, docs/operator.md "Distributed training") and are skipped without it.
"""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from tests.cluster import plugin
from tests.e2e import operator_env as env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRAINER = env.REPO / "trainer_image" / "lora_trainer"
needs_distributed_trainer = pytest.mark.skipif(
    not any("LORA_NNODES" in p.read_text(errors="replace") for p in TRAINER.rglob("*.py")),
    reason="the trainer does not read LORA_NNODES yet (issue 13, trainer side)",
)
PYTHON = "python:3.11"  # the node agent runs it as this environment's python
# a group of 4 CPU processes and its one-process reference train side by side: on a busy 2-core machine a
# run with a restart takes longer than the tier's 900 s default (pyproject [tool.pytest] timeout)
TRAINING_TIMEOUT = 1800


def pod_body(name, command, node=None, hostname=None, subdomain=None, labels=None, requests=None):
    spec = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 2,
        "containers": [
            {"name": "main", "image": PYTHON, "command": ["python", "-c", command], "resources": requests or {}}
        ],
    }
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    if hostname:
        spec["hostname"] = hostname
    if subdomain:
        spec["subdomain"] = subdomain
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}}, "spec": spec}


def create(cluster, namespace, body):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


def get(cluster, namespace, kind, name):
    out = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


RESOLVE = """
import json, socket, time
names = ["b.sub", "b.sub.{ns}.svc", "b.sub.{ns}.svc.cluster.local"]
deadline = time.time() + 60
while True:
    try:
        found = {{n: socket.gethostbyname(n) for n in names}}
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.5)
me = socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP, flags=socket.AI_CANONNAME)[0]
print(json.dumps({{"found": found, "hostname": socket.gethostname(), "canonical": me[3], "ip": me[4][0]}}))
"""


def test_pods_resolve_a_sibling_on_another_node_by_hostname_and_subdomain(kube_cluster, second_node, namespace):
    """Cluster DNS for a headless Service, as the node agent gives it: <hostname>.<subdomain>[.<ns>.svc[.domain]]."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "sub"},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"app": "dns"}},
    }
    create(kube_cluster, namespace, service)
    sleeper = "import time; time.sleep(300)"
    create(kube_cluster, namespace, pod_body("b", sleeper, "local-node-2", "b", "sub", {"app": "dns"}))
    asker = RESOLVE.format(ns=namespace)
    create(kube_cluster, namespace, pod_body("a", asker, "local-node", "a", "sub", {"app": "dns"}))
    done = env.wait_until(
        lambda: (
            (get(kube_cluster, namespace, "pod", "a") or {}).get("status", {}).get("phase") in ("Succeeded", "Failed")
            and get(kube_cluster, namespace, "pod", "a")
        ),
        120,
        "pod a to resolve pod b",
    )
    log = kube_cluster.kubectl("logs", "a", "-n", namespace).stdout
    assert done["status"]["phase"] == "Succeeded", log
    answer = json.loads(log.strip().splitlines()[-1])
    b = get(kube_cluster, namespace, "pod", "b")
    assert b["spec"]["nodeName"] == "local-node-2" and done["spec"]["nodeName"] == "local-node"
    assert set(answer["found"].values()) == {b["status"]["podIP"]}
    assert b["status"]["podIP"].startswith(f"{plugin.SESSION_NET}.2.")  # the second node's pod addresses
    # its own name: the pod's host name, whose canonical form is its FQDN under the subdomain
    assert answer["hostname"] == "a" and answer["canonical"] == f"a.sub.{namespace}.svc.cluster.local"
    assert answer["ip"] == done["status"]["podIP"]


def test_a_crashed_node_s_pods_are_failed_and_replaced_on_the_other(kube_cluster, node_agent, second_node, namespace):
    """The non-graceful node shutdown path the multi-node tests rely on: crash, out-of-service taint, PodGC."""
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "pair"},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
            },
            "template": {
                "spec": pod_body("x", "import time; time.sleep(300)", requests={"requests": {"memory": "20Gi"}})["spec"]
            },
        },
    }
    create(kube_cluster, namespace, job)

    def placed():
        pods = json.loads(kube_cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return running if len(running) == 2 else None

    first = env.wait_until(placed, 60, "both pods running")
    assert {p["spec"]["nodeName"] for p in first} == {"local-node", "local-node-2"}  # spread: least allocated
    lost = next(p for p in first if p["spec"]["nodeName"] == "local-node-2")
    second_node.crash()
    second_node.mark_out_of_service()

    def replaced():
        pods = json.loads(kube_cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        names = {p["metadata"]["name"] for p in pods}
        fresh = [p for p in pods if p["metadata"]["name"] not in {q["metadata"]["name"] for q in first}]
        return fresh if lost["metadata"]["name"] not in names and fresh else None

    (replacement,) = env.wait_until(replaced, 120, "the dead node's pod failed, removed and replaced")
    index = "batch.kubernetes.io/job-completion-index"
    assert replacement["metadata"]["annotations"][index] == lost["metadata"]["annotations"][index]
    env.wait_until(
        lambda: (
            (get(kube_cluster, namespace, "pod", replacement["metadata"]["name"]) or {}).get("spec", {}).get("nodeName")
            == "local-node"
        ),
        60,
        "the replacement on the live node",
    )
    assert (get(kube_cluster, namespace, "job", "pair")["status"].get("failed") or 0) == 0  # a disruption, not counted
    second_node.recover()


# ---------------------------------------------------------------------------------------------
# the operator


def group_manifest(name, bucket, steps, save_steps, **spec):
    """2 nodes x 2 CPU processes, 2 samples each: a global batch of 8, as reference_manifest's one process."""
    return env.sd_manifest(
        name,
        bucket,
        steps=steps,
        save_steps=save_steps,
        training={"rank": 4, "batchSize": 2, "steps": steps, "learningRate": 1e-3, "seed": 7},
        resources={"gpus": 0, "nodes": 2, "processesPerNode": 2, "cpu": "1", "memory": "20Gi"},
        **spec,
    )


def reference_manifest(name, bucket, steps, save_steps):
    return env.sd_manifest(
        name,
        bucket,
        steps=steps,
        save_steps=save_steps,
        training={"rank": 4, "batchSize": 8, "steps": steps, "learningRate": 1e-3, "seed": 7},
    )


def final_weights(jobs, name):
    from safetensors.torch import load

    status = jobs.status(name)
    uri = next(a["uri"] for a in status["artifacts"] if a["uri"].endswith("/pytorch_lora_weights.safetensors"))
    return load(jobs.s3_bytes(uri))


def assert_same_weights(jobs, name, reference, atol=1e-5):
    ours, theirs = final_weights(jobs, name), final_weights(jobs, reference)
    assert ours.keys() == theirs.keys()
    worst = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)
    assert worst <= atol, f"{name} differs from {reference} by up to {worst:g}"


RENDEZVOUS_PORT = 29400


def rendezvous_port_free():
    """Whether worker 0 of a new group can listen on the rendezvous port. The node agent's pods share the
    host's network namespace (each has its own loopback IP, not its own ports), and PyTorch's c10d store
    listens on every address: a group of an earlier test whose pods are still stopping holds the port."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", RENDEZVOUS_PORT))
        except OSError:
            return False
    return True


@pytest.fixture
def group_port():
    env.wait_until(rendezvous_port_free, 180, f"port {RENDEZVOUS_PORT} free of an earlier test's group")


def worker_pods(jobs, name):
    return [
        p for p in jobs.pods(name) if p["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "trainer"
    ]


def group_logs(jobs, name):
    return "\n".join(jobs.kubectl("logs", p["metadata"]["name"], check=False).stdout for p in worker_pods(jobs, name))


def succeeded(jobs, name, timeout):
    """The job's status once it Succeeded, polled: a Failed job fails the test at once with its status, where
    kubectl wait --for=condition=Succeeded would wait out its whole timeout."""

    def done():
        status = jobs.status(name)
        assert status.get("phase") != "Failed", f"{name} failed: {status}"
        return status if status.get("phase") == "Succeeded" else None

    return env.wait_until(done, timeout, f"{jobs.namespace}/{name} Succeeded", interval=2)


def termination_messages(jobs, name):
    """{worker index: the JSON termination message of its newest pod}."""
    messages = {}
    for pod in worker_pods(jobs, name):
        index = int(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
        (container,) = pod["status"]["containerStatuses"]
        messages[index] = json.loads(container["state"]["terminated"]["message"])
    return messages


def checkpointed(jobs, name, save):
    key = f"out/{name}/checkpoints/state_step_{save}/manifest.json"
    return lambda: (
        (jobs.status(name).get("progress") or {}).get("step", 0) > save
        and key in jobs.s3_keys(f"out/{name}/checkpoints/")
    )


@needs_distributed_trainer
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_two_nodes_of_two_processes_train_the_weights_of_one_process(jobs, second_node, group_port):
    steps, save = 24, 8
    # 40Gi per worker: one fits on each 64Gi node, so the pods go to both (least-allocated scoring alone would
    # put both on one node whenever pods of earlier tests still hold memory on the other)
    wait_for_memory(jobs, 40 * 2**30)
    jobs.apply(reference_manifest("single", jobs.bucket, steps, save))
    group = group_manifest("group", jobs.bucket, steps, save)
    group["spec"]["resources"]["memory"] = "40Gi"
    jobs.apply(group)
    succeeded(jobs, "group", 600)
    succeeded(jobs, "single", 300)
    status = jobs.status("group")
    assert status["attempts"] == 1 and status["progress"]["step"] == steps
    assert [(w["index"], w["phase"]) for w in status["workers"]] == [(0, "Succeeded"), (1, "Succeeded")]
    assert {w["node"] for w in status["workers"]} == {"local-node", "local-node-2"}
    assert status["children"]["service"] == "group-workers"
    # one world of 4 processes over the 2 pods: each pod passes on its first worker's message; global rank 0
    # (on either pod: ranks come from the rendezvous) alone reports the weights, and status takes its artifacts
    messages = termination_messages(jobs, "group")
    assert sorted(messages) == [0, 1] and all(m["exitCode"] == 0 for m in messages.values())
    assert {m["worldSize"] for m in messages.values()} == {4}
    assert sorted(m["rank"] for m in messages.values()) == [0, 2]
    (main,) = [m for m in messages.values() if m["rank"] == 0]
    (other,) = [m for m in messages.values() if m["rank"] != 0]
    assert not other.get("artifacts") and main["step"] == steps
    assert [a["uri"] for a in status["artifacts"]] == [a["uri"] for a in main["artifacts"]]
    assert_same_weights(jobs, "group", "single")


@needs_distributed_trainer
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_a_killed_worker_process_restarts_the_group_in_place(jobs, second_node, group_port):
    steps, save = 64, 16  # the kill or crash comes after the checkpoint at 16
    jobs.apply(reference_manifest("single", jobs.bucket, steps, save))
    jobs.apply(group_manifest("group", jobs.bucket, steps, save))
    env.wait_until(checkpointed(jobs, "group", save), 600, "a checkpoint of the group")

    def a_worker():
        for pod in worker_pods(jobs, "group"):
            pids = env.find_worker_pids(jobs.namespace, pod["metadata"]["name"])
            if pids:
                return pids
        return None

    os.kill(env.wait_until(a_worker, 60, "a worker process")[-1], signal.SIGKILL)
    succeeded(jobs, "group", 900)
    succeeded(jobs, "single", 300)
    assert jobs.status("group")["attempts"] == 1  # restarted by PyTorch elastic, without new pods
    assert len(worker_pods(jobs, "group")) == 2
    assert "resumed from" in group_logs(jobs, "group")
    assert_same_weights(jobs, "group", "single")


@needs_distributed_trainer
@pytest.mark.timeout(TRAINING_TIMEOUT)
def test_a_node_crash_under_a_worker_restarts_the_group_from_its_checkpoint(jobs, node_agent, second_node, group_port):
    steps, save = 64, 16  # the kill or crash comes after the checkpoint at 16
    jobs.apply(reference_manifest("single", jobs.bucket, steps, save))
    jobs.apply(group_manifest("group", jobs.bucket, steps, save, backoffLimit=2))
    env.wait_until(checkpointed(jobs, "group", save), 600, "a checkpoint of the group")
    workers = {w["index"]: w for w in jobs.status("group")["workers"]}
    victim = {"local-node": node_agent, "local-node-2": second_node}[workers[1]["node"]]
    victim.crash()
    victim.mark_out_of_service()  # the node is gone for good: its pods are failed and replaced
    succeeded(jobs, "group", 900)
    succeeded(jobs, "single", 300)
    status = jobs.status("group")
    assert status["attempts"] == 2 and status["workers"][1]["attempts"] == 2
    training_job = jobs.get(status["children"]["job"], kind="job")
    assert (training_job["status"].get("failed") or 0) == 0  # a disruption, not a failure
    failed = [e for e in jobs.events("group") if e["reason"] == "WorkerFailed"]
    assert failed and workers[1]["pod"] in failed[0]["message"] and "worker 1" in failed[0]["message"]
    assert_same_weights(jobs, "group", "single")
    victim.recover()


def wait_for_memory(jobs, needed):
    for node in ("local-node", "local-node-2"):
        env.wait_until(lambda n=node: memory_free(jobs.cluster, n) >= needed, 120, f"{needed >> 30}Gi free on {node}")


def memory_free(cluster, node):
    """Memory of `node` that no non-terminal pod requests (pods of earlier tests may still be stopping)."""
    from tests.cluster import podspec

    pods = json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    used = sum(
        podspec.pod_requests(p["spec"]).get("memory", 0)
        for p in pods
        if p["spec"].get("nodeName") == node and p["status"].get("phase") not in ("Succeeded", "Failed")
    )
    return podspec.parse_quantity("64Gi") - used


def test_a_group_that_cannot_all_be_scheduled_holds_nothing(jobs, second_node, group_port):
    # 40Gi per worker: one fits on each 64Gi node, so 2 of 3 workers start and the third cannot
    wait_for_memory(jobs, 40 * 2**30)
    manifest = group_manifest("too-big", jobs.bucket, 24, 8)
    manifest["spec"]["resources"] |= {"nodes": 3, "memory": "40Gi"}
    jobs.apply(manifest)
    # the operator's children: the headless Service of the workers and an Indexed Job whose pods use it
    service = env.wait_until(lambda: jobs.get("too-big-workers", kind="service"), 60, "the workers' Service")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    job = jobs.get("too-big-train", kind="job")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 3
    assert job["spec"]["backoffLimitPerIndex"] == 3 and job["spec"]["maxFailedIndexes"] == 0
    pending = jobs.wait_phase("too-big", "Pending", 120, reason="Unschedulable")
    assert "1 of 3 workers cannot be scheduled" in pending["message"]
    assert "Insufficient memory" in pending["message"]
    pods = worker_pods(jobs, "too-big")
    placed = [p for p in pods if p["spec"].get("nodeName")]
    assert placed and {p["spec"]["hostname"] for p in pods} <= {"too-big-train-0", "too-big-train-1", "too-big-train-2"}
    assert all(p["spec"]["subdomain"] == "too-big-workers" for p in pods)
    envs = {e["name"]: e for e in placed[0]["spec"]["containers"][0]["env"]}
    assert envs["LORA_NNODES"]["value"] == "3" and envs["LORA_NPROC_PER_NODE"]["value"] == "2"
    endpoint = f"too-big-train-0.too-big-workers.{jobs.namespace}.svc.cluster.local:29400"
    assert envs["LORA_RDZV_ENDPOINT"]["value"] == endpoint

    released = jobs.wait_phase("too-big", "Pending", 120, reason="WorkersUnschedulable")
    assert "1 of 3 workers could not be scheduled" in released["message"] and "retrying at" in released["message"]
    assert released["scheduling"]["releases"] == 1 and released["scheduling"]["retryAt"]
    assert jobs.get("too-big-train", kind="job")["spec"]["suspend"] is True
    env.wait_until(lambda: not jobs.pods("too-big"), 120, "every worker pod gone: the group holds no node")
    status = jobs.status("too-big")
    assert (status["phase"], status["reason"]) == ("Pending", "WorkersUnschedulable")
    assert any(e["reason"] == "WorkersUnschedulable" and e["type"] == "Warning" for e in jobs.events("too-big"))

    # at retryAt (60 s, LORA_OPERATOR_GROUP_RETRY_SECONDS in conftest) the Job is resumed, the group placed
    # again, stuck again and released again, now for twice as long
    env.wait_until(lambda: jobs.pods("too-big"), 120, "the group placed again at retryAt")
    again = env.wait_until(
        lambda: (jobs.status("too-big").get("scheduling") or {}).get("releases") == 2 and jobs.status("too-big"),
        120,
        "the second release",
    )
    assert again["reason"] == "WorkersUnschedulable" and again["attempts"] == 2
    assert jobs.get("too-big-train", kind="job")["spec"]["suspend"] is True
    jobs.kubectl("delete", "ltj", "too-big", "--wait=false")
