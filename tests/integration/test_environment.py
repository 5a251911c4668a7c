"""The test environment itself: real control plane, node agent, SeaweedFS S3, Prometheus, Pushgateway.

Each test asserts behaviour the operator and trainer tests rely on, against the real services.
"""

import json
import re
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.cluster import plugin
from tests.cluster.kubeapi import ApiError, resource_path
from tests.cluster.procs import free_port, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GROUP = "envtest.lora-operator.io"

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "mode": {"type": "string", "enum": ["fast", "slow"]},
                                },
                            },
                            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                        },
                    }
                },
            }
        ],
    },
}


# ------------------------------------------------------------------------------------------------
# helpers


def pod_manifest(name, command, restart_policy="Never", image="python:3.12", **container_fields):
    pod_spec = container_fields.pop("pod_spec", {})
    container = {"name": "main", "image": image, "command": command, **container_fields}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": restart_policy, "containers": [container], **pod_spec},
    }


def python_pod(name, code, **kwargs):
    return pod_manifest(name, ["python", "-c", code], **kwargs)


def create_pod(api, namespace, manifest):
    return api.create(resource_path("v1", "pods", namespace), manifest)


def pod_path(namespace, name):
    return resource_path("v1", "pods", namespace, name)


def phase_is(*phases):
    return lambda pod: pod.get("status", {}).get("phase") in phases


def condition(obj, ctype):
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == ctype), None)


def container_state(pod, name="main"):
    status = next((s for s in pod["status"].get("containerStatuses") or [] if s["name"] == name), {})
    return status.get("state", {})


@pytest.fixture(scope="module")
def widget_crd(kube_cluster):
    kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(CRD))
    kube_cluster.kubectl("wait", "--for=condition=Established", f"crd/widgets.{GROUP}", "--timeout=30s")
    return f"/apis/{GROUP}/v1"


# ------------------------------------------------------------------------------------------------
# control plane


def test_apiserver_reports_the_pinned_kubernetes_release(kube_cluster):
    pinned = re.search(r"k8s\.io/kubernetes (v\S+)", (REPO / "tests/controlplane/go.mod").read_text()).group(1)
    assert kube_cluster.api.get("/version")["gitVersion"] == pinned
    assert f"Server Version: {pinned}" in kube_cluster.kubectl("version").stdout


def test_servers_listen_on_loopback_only(kube_cluster, node_agent, s3_server, pushgateway, prometheus):
    services = [*kube_cluster.services, s3_server.service, prometheus.service, pushgateway.service]
    pids = {str(s.proc.pid) for s in services}
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ours = [line.split()[3] for line in out.splitlines() if set(re.findall(r"pid=(\d+)", line)) & pids]
    assert len(ours) >= 12, out  # etcd 2, apiserver, controller-manager, weed 8, prometheus, pushgateway
    assert all(address.startswith("127.0.0.1:") for address in ours), ours
    assert f"127.0.0.1:{node_agent.log_server.port} " in out


def test_crd_schema_rejects_a_bad_object_with_the_apiservers_message(kube_cluster, widget_crd, namespace):
    bad = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": {"size": 0, "mode": "sideways"},
    }
    out = kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert out.returncode != 0
    assert 'The Widget "bad" is invalid' in out.stderr
    assert "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1" in out.stderr
    assert 'spec.mode: Unsupported value: "sideways": supported values: "fast", "slow"' in out.stderr


def test_crd_prunes_unknown_fields(kube_cluster, widget_crd, namespace):
    path = f"{widget_crd}/namespaces/{namespace}/widgets"
    kube_cluster.api.create(
        path,
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"size": 2, "color": "red"},
            "extra": True,
        },
    )
    stored = kube_cluster.api.get(f"{path}/w")
    assert stored["spec"] == {"size": 2}
    assert "extra" not in stored


def test_status_subresource_leaves_spec_and_generation_alone(kube_cluster, widget_crd, namespace):
    api, path = kube_cluster.api, f"{widget_crd}/namespaces/{namespace}/widgets"
    created = api.create(
        path, {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1}}
    )
    assert created["metadata"]["generation"] == 1
    updated = api.patch(f"{path}/w/status", {"spec": {"size": 5}, "status": {"phase": "Running"}})
    assert updated["status"] == {"phase": "Running"}
    assert updated["spec"] == {"size": 1}
    assert updated["metadata"]["generation"] == 1
    # and the main resource ignores status while spec changes bump the generation
    again = api.patch(f"{path}/w", {"spec": {"size": 3}, "status": {"phase": "Ignored"}})
    assert again["metadata"]["generation"] == 2
    assert again["status"] == {"phase": "Running"}


def test_stale_resource_version_gets_409(kube_cluster, widget_crd, namespace):
    api, path = kube_cluster.api, f"{widget_crd}/namespaces/{namespace}/widgets"
    stale = api.create(
        path, {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1}}
    )
    api.patch(f"{path}/w", {"spec": {"size": 2}})
    stale["spec"]["size"] = 3
    with pytest.raises(ApiError) as err:
        api.replace(f"{path}/w", stale)
    assert err.value.status == 409
    assert err.value.reason == "Conflict"
    assert "the object has been modified" in err.value.message


def test_garbage_collector_deletes_children_of_a_deleted_owner(kube_cluster, namespace):
    api = kube_cluster.api
    cms = resource_path("v1", "configmaps", namespace)
    owner = api.create(cms, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}})
    api.create(
        cms,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "child",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
                ],
            },
        },
    )
    api.delete(f"{cms}/owner")
    api.wait_gone(f"{cms}/child", timeout=30)


def test_default_service_account_and_root_ca_exist_in_new_namespaces(kube_cluster, namespace):
    api = kube_cluster.api
    assert api.get(resource_path("v1", "serviceaccounts", namespace, "default"))
    ca = api.wait_for(resource_path("v1", "configmaps", namespace, "kube-root-ca.crt"), bool, timeout=30)
    assert "BEGIN CERTIFICATE" in ca["data"]["ca.crt"]


# ------------------------------------------------------------------------------------------------
# node agent


def test_job_completes_through_the_job_controller(kube_cluster, node_agent, namespace):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "hello"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "main", "image": "python:3.12", "command": ["python", "-c", "print('job says hi')"]}
                    ],
                }
            },
        },
    }
    api = kube_cluster.api
    api.create(resource_path("batch/v1", "jobs", namespace), job)
    done = api.wait_for(
        resource_path("batch/v1", "jobs", namespace, "hello"),
        lambda j: (condition(j, "Complete") or {}).get("status") == "True",
        timeout=60,
    )
    assert done["status"]["succeeded"] == 1
    pods = api.get(resource_path("v1", "pods", namespace), labelSelector="job-name=hello")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Succeeded"]
    assert kube_cluster.kubectl("logs", "-n", namespace, "job/hello").stdout == "job says hi\n"


def test_env_from_secret_configmap_fieldref_and_mounted_configmap(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    api.create(
        resource_path("v1", "configmaps", namespace),
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cfg"},
            "data": {"greeting": "hello", "train.yaml": "lora_rank: 4\n"},
        },
    )
    api.create(
        resource_path("v1", "secrets", namespace),
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"key": "s3cr3t"}},
    )
    code = (
        "import json, os; print(json.dumps({**{k: os.environ.get(k) for k in "
        "['GREETING', 'KEY', 'POD_NAME', 'POD_NAMESPACE', 'POD_IP', 'COMBINED']}, "
        "'config': open('/etc/lora/train.yaml').read(), 'token': os.path.exists("
        "'/var/run/secrets/kubernetes.io/serviceaccount/token')}))"
    )
    env = [
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "COMBINED", "value": "$(GREETING)-$(POD_NAME)"},
    ]
    create_pod(
        api,
        namespace,
        python_pod(
            "envpod",
            code,
            env=env,
            volumeMounts=[{"name": "cfg", "mountPath": "/etc/lora", "readOnly": True}],
            pod_spec={"volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}]},
        ),
    )
    pod = api.wait_for(pod_path(namespace, "envpod"), phase_is("Succeeded", "Failed"), timeout=60)
    assert pod["status"]["phase"] == "Succeeded"
    seen = json.loads(kube_cluster.kubectl("logs", "-n", namespace, "envpod").stdout)
    assert seen == {
        "GREETING": "hello",
        "KEY": "s3cr3t",
        "POD_NAME": "envpod",
        "POD_NAMESPACE": namespace,
        "POD_IP": pod["status"]["podIP"],
        "COMBINED": "hello-envpod",
        "config": "lora_rank: 4\n",
        "token": True,
    }
    assert re.fullmatch(rf"{re.escape(plugin.SESSION_NET)}\.0\.\d+", pod["status"]["podIP"])  # this session's own
    assert not Path("/etc/lora/train.yaml").exists()  # the mount was private to the pod


def test_missing_secret_is_create_container_config_error(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]
    create_pod(api, namespace, python_pod("nosecret", "print(1)", env=env))
    pod = api.wait_for(
        pod_path(namespace, "nosecret"),
        lambda p: container_state(p).get("waiting", {}).get("reason") == "CreateContainerConfigError",
    )
    assert container_state(pod)["waiting"]["message"] == 'secret "absent" not found'
    assert pod["status"]["phase"] == "Pending"


def test_exit_code_and_termination_message_are_reported(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    code = "import sys; open('/dev/termination-log', 'w').write('{\"error\": \"bad dataset\"}'); sys.exit(3)"
    create_pod(api, namespace, python_pod("fails", code))
    pod = api.wait_for(pod_path(namespace, "fails"), phase_is("Succeeded", "Failed"), timeout=60)
    assert pod["status"]["phase"] == "Failed"
    terminated = container_state(pod)["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    assert terminated["message"] == '{"error": "bad dataset"}'


def test_restart_policy_on_failure_restarts_until_success(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    code = (
        "import os, sys; m = '/tmp/marker'\n"
        "if not os.path.exists(m): open(m, 'w').close(); sys.exit(1)\n"
        "print('second run')"
    )
    create_pod(
        api,
        namespace,
        python_pod(
            "flaky",
            code,
            restart_policy="OnFailure",
            volumeMounts=[{"name": "work", "mountPath": "/tmp"}],
            pod_spec={"volumes": [{"name": "work", "emptyDir": {}}]},
        ),
    )
    pod = api.wait_for(pod_path(namespace, "flaky"), phase_is("Succeeded", "Failed"), timeout=60)
    assert pod["status"]["phase"] == "Succeeded"
    status = pod["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert node_agent.container_log(namespace, "flaky") == "second run\n"
    assert not Path("/tmp/marker").exists()  # the emptyDir at /tmp was the pod's own


def test_restart_policy_always_restarts_with_back_off(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    create_pod(api, namespace, python_pod("looper", "print('tick')", restart_policy="Always"))
    pod = api.wait_for(
        pod_path(namespace, "looper"),
        lambda p: (p["status"].get("containerStatuses") or [{}])[0].get("restartCount", 0) >= 2,
        timeout=30,
    )
    status = pod["status"]["containerStatuses"][0]
    assert pod["status"]["phase"] == "Running"
    assert status["lastState"]["terminated"]["exitCode"] == 0
    assert kube_cluster.kubectl("logs", "-n", namespace, "looper", "--previous").stdout == "tick\n"


def test_init_container_runs_first_and_shares_an_empty_dir(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    manifest = python_pod(
        "initialized",
        "print(open('/shared/ready').read())",
        volumeMounts=[{"name": "shared", "mountPath": "/shared"}],
        pod_spec={"volumes": [{"name": "shared", "emptyDir": {}}]},
    )
    manifest["spec"]["initContainers"] = [
        {
            "name": "prepare",
            "image": "python:3.12",
            "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
            "command": ["python", "-c", "open('/shared/ready', 'w').write('prepared by init')"],
        }
    ]
    create_pod(api, namespace, manifest)
    pod = api.wait_for(pod_path(namespace, "initialized"), phase_is("Succeeded", "Failed"), timeout=60)
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert node_agent.container_log(namespace, "initialized") == "prepared by init\n"


def test_active_deadline_fails_the_pod(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    create_pod(api, namespace, pod_manifest("slow", ["sleep", "60"], pod_spec={"activeDeadlineSeconds": 2}))
    pod = api.wait_for(pod_path(namespace, "slow"), phase_is("Failed"), timeout=30)
    assert pod["status"]["reason"] == "DeadlineExceeded"
    assert container_state(pod)["terminated"]["exitCode"] == 143  # SIGTERM


def test_mount_over_the_python_environment_is_a_create_container_error(kube_cluster, node_agent, namespace):
    import sys

    manifest = python_pod(
        "shadow",
        "print(1)",
        volumeMounts=[{"name": "v", "mountPath": sys.prefix}],
        pod_spec={"volumes": [{"name": "v", "emptyDir": {}}]},
    )
    create_pod(kube_cluster.api, namespace, manifest)
    pod = kube_cluster.api.wait_for(
        pod_path(namespace, "shadow"),
        lambda p: container_state(p).get("waiting", {}).get("reason") == "CreateContainerError",
        timeout=30,
    )
    assert f"mountPath {sys.prefix} would hide" in container_state(pod)["waiting"]["message"]


def test_unknown_image_waits_in_image_pull_errors(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    create_pod(api, namespace, pod_manifest("noimage", ["true"], image="registry.invalid/nothing:1"))
    reasons = set()

    def saw_both(pod):
        reasons.add(container_state(pod).get("waiting", {}).get("reason"))
        return {"ErrImagePull", "ImagePullBackOff"} <= reasons

    pod = api.wait_for(pod_path(namespace, "noimage"), saw_both, timeout=30, interval=0.1)
    assert pod["status"]["phase"] == "Pending"


def test_pod_annotation_forces_image_pull_failure(kube_cluster, node_agent, namespace):
    from tests.cluster.node_agent import IMAGE_PULL_ERROR_ANNOTATION

    manifest = python_pod("forced", "print(1)")
    manifest["metadata"]["annotations"] = {IMAGE_PULL_ERROR_ANNOTATION: "true"}
    create_pod(kube_cluster.api, namespace, manifest)
    kube_cluster.api.wait_for(
        pod_path(namespace, "forced"),
        lambda p: container_state(p).get("waiting", {}).get("reason") in ("ErrImagePull", "ImagePullBackOff"),
        timeout=30,
    )


@pytest.mark.parametrize(
    "resources, pod_spec, message",
    [
        ({"limits": {"nvidia.com/gpu": "3"}}, {}, "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."),
        ({"requests": {"cpu": "64"}}, {}, "0/1 nodes are available: 1 Insufficient cpu."),
        ({}, {"nodeSelector": {"gpu": "a100"}}, "0/1 nodes are available: 1 node(s) didn't match Node selector."),
    ],
    ids=["gpu", "cpu", "selector"],
)
def test_unschedulable_pod_stays_pending(kube_cluster, node_agent, namespace, resources, pod_spec, message):
    api = kube_cluster.api
    create_pod(api, namespace, python_pod("big", "print(1)", resources=resources, pod_spec=pod_spec))
    pod = api.wait_for(pod_path(namespace, "big"), lambda p: condition(p, "PodScheduled"), timeout=30)
    scheduled = condition(pod, "PodScheduled")
    assert (scheduled["status"], scheduled["reason"], scheduled["message"]) == ("False", "Unschedulable", message)
    time.sleep(1)
    pod = api.get(pod_path(namespace, "big"))
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_gpus_are_accounted_across_pods(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    gpu = {"limits": {"nvidia.com/gpu": "2"}}
    create_pod(api, namespace, pod_manifest("first", ["sleep", "30"], resources=gpu))
    api.wait_for(pod_path(namespace, "first"), phase_is("Running"), timeout=30)
    create_pod(api, namespace, pod_manifest("second", ["sleep", "30"], resources=gpu))
    pod = api.wait_for(pod_path(namespace, "second"), lambda p: condition(p, "PodScheduled"), timeout=30)
    assert "Insufficient nvidia.com/gpu" in condition(pod, "PodScheduled")["message"]
    api.delete(pod_path(namespace, "first"), grace_period_seconds=1)
    api.wait_for(pod_path(namespace, "second"), phase_is("Running"), timeout=30)


def test_pod_gets_sigterm_on_deletion(kube_cluster, node_agent, namespace, tmp_path):
    api = kube_cluster.api
    marker = tmp_path / "sigterm.txt"
    code = (
        "import signal, sys, time\n"
        "def bye(sig, frame):\n"
        f"    open({str(marker)!r}, 'w').write('got SIGTERM'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)"
    )
    create_pod(api, namespace, python_pod("graceful", code))
    wait_until(lambda: "ready" in node_agent.container_log(namespace, "graceful"), 30, "handler installed")
    started = time.monotonic()
    api.delete(pod_path(namespace, "graceful"))  # default grace period: 30 s
    api.wait_gone(pod_path(namespace, "graceful"), timeout=20)
    assert time.monotonic() - started < 10
    assert marker.read_text() == "got SIGTERM"


def test_pod_ignoring_sigterm_is_killed_after_its_grace_period(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"
    create_pod(api, namespace, python_pod("stubborn", code, pod_spec={"terminationGracePeriodSeconds": 2}))
    wait_until(lambda: "ready" in node_agent.container_log(namespace, "stubborn"), 30, "pod running")
    started = time.monotonic()
    api.delete(pod_path(namespace, "stubborn"))
    api.wait_gone(pod_path(namespace, "stubborn"), timeout=20)
    assert 2 <= time.monotonic() - started < 10


@pytest.mark.parametrize("reason", ["EvictionByEvictionAPI", "PreemptionByScheduler"])
def test_evicted_pod_shows_disruption_target_then_goes(kube_cluster, node_agent, namespace, reason):
    api = kube_cluster.api
    create_pod(api, namespace, pod_manifest("victim", ["sleep", "60"]))
    api.wait_for(pod_path(namespace, "victim"), phase_is("Running"), timeout=30)
    node_agent.evict(namespace, "victim", reason=reason)
    pod = api.wait_for(pod_path(namespace, "victim"), lambda p: condition(p, "DisruptionTarget"), timeout=10)
    target = condition(pod, "DisruptionTarget")
    assert (target["status"], target["reason"]) == ("True", reason)
    assert pod["metadata"].get("deletionTimestamp")
    api.wait_gone(pod_path(namespace, "victim"), timeout=20)


def test_kubelet_eviction_fails_the_pod_with_reason_evicted(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    create_pod(api, namespace, pod_manifest("pressured", ["sleep", "60"]))
    api.wait_for(pod_path(namespace, "pressured"), phase_is("Running"), timeout=30)
    node_agent.evict(namespace, "pressured", reason="TerminationByKubelet")
    pod = api.wait_for(pod_path(namespace, "pressured"), phase_is("Failed"), timeout=20)
    assert pod["status"]["reason"] == "Evicted"
    assert condition(pod, "DisruptionTarget")["reason"] == "TerminationByKubelet"


def test_memory_limit_gives_oomkilled(kube_cluster, node_agent, namespace):
    if node_agent.cgroups.root is None:
        pytest.skip("no writable memory cgroup here; limits are not enforced")
    api = kube_cluster.api
    code = "x = bytearray(400 * 1024 * 1024); print(len(x))"
    create_pod(api, namespace, python_pod("hog", code, resources={"limits": {"memory": "100Mi"}}))
    pod = api.wait_for(pod_path(namespace, "hog"), phase_is("Succeeded", "Failed"), timeout=60)
    terminated = container_state(pod)["terminated"]
    assert (pod["status"]["phase"], terminated["reason"], terminated["exitCode"]) == ("Failed", "OOMKilled", 137)


def test_node_crash_kills_processes_and_marks_the_node_not_ready(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    create_pod(api, namespace, python_pod("doomed", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"))
    api.wait_for(pod_path(namespace, "doomed"), phase_is("Running"), timeout=30)
    pid = int(wait_until(lambda: node_agent.container_log(namespace, "doomed").strip(), 30, "pid printed"))
    node_agent.crash()  # returns once kube-controller-manager has noticed the missing heartbeats
    assert not Path(f"/proc/{pid}").exists()
    node = api.get(resource_path("v1", "nodes", name=node_agent.name))
    assert condition(node, "Ready")["status"] == "Unknown"
    assert condition(node, "Ready")["reason"] == "NodeStatusUnknown"
    api.wait_for(
        resource_path("v1", "nodes", name=node_agent.name),
        lambda n: any(t["key"] == "node.kubernetes.io/unreachable" for t in n["spec"].get("taints") or []),
        timeout=30,
    )
    api.wait_for(pod_path(namespace, "doomed"), lambda p: condition(p, "Ready")["status"] == "False", timeout=30)
    node_agent.recover()
    pod = api.wait_for(pod_path(namespace, "doomed"), phase_is("Failed"), timeout=30)
    assert container_state(pod)["terminated"]["reason"] == "ContainerStatusUnknown"
    api.wait_for(
        resource_path("v1", "nodes", name=node_agent.name),
        lambda n: not any(t["key"].startswith("node.kubernetes.io/") for t in n["spec"].get("taints") or []),
        timeout=30,
    )


def test_node_agent_reconnects_after_an_apiserver_restart(kube_cluster, node_agent, namespace):
    api = kube_cluster.api
    kube_cluster.restart_apiserver()
    create_pod(api, namespace, python_pod("after-restart", "print('still here')"))
    pod = api.wait_for(pod_path(namespace, "after-restart"), phase_is("Succeeded", "Failed"), timeout=60)
    assert pod["status"]["phase"] == "Succeeded"
    wait_until(lambda: node_agent.node_ready() == "True", 30, "the node Ready again")


# ------------------------------------------------------------------------------------------------
# S3


def test_s3_put_get_list(s3_server, s3_bucket):
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="datasets/a/metadata.csv", Body=b"file_name,text\n")
    s3.put_object(Bucket=s3_bucket, Key="datasets/a/1.png", Body=b"\x89PNG")
    s3.put_object(Bucket=s3_bucket, Key="other.txt", Body=b"x")
    assert s3.get_object(Bucket=s3_bucket, Key="datasets/a/metadata.csv")["Body"].read() == b"file_name,text\n"
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="datasets/")
    assert sorted(o["Key"] for o in listed["Contents"]) == ["datasets/a/1.png", "datasets/a/metadata.csv"]


def test_s3_rejects_wrong_credentials(s3_server, s3_bucket):
    import boto3
    from botocore.exceptions import ClientError

    bad = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id="nobody",
        aws_secret_access_key="wrong",
        region_name=s3_server.region,
    )
    with pytest.raises(ClientError) as err:
        bad.list_objects_v2(Bucket=s3_bucket)
    assert err.value.response["Error"]["Code"] == "InvalidAccessKeyId"


def test_s3_stop_and_restart_keep_port_and_data(s3_server, s3_bucket):
    from botocore.exceptions import EndpointConnectionError

    s3_server.client().put_object(Bucket=s3_bucket, Key="ckpt/step_10.safetensors", Body=b"weights")
    endpoint = s3_server.endpoint_url
    s3_server.stop()
    with pytest.raises(EndpointConnectionError):
        s3_server.client(retries=0).list_objects_v2(Bucket=s3_bucket)
    s3_server.start()
    assert s3_server.endpoint_url == endpoint
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="ckpt/step_10.safetensors")["Body"].read()
    assert body == b"weights"


# ------------------------------------------------------------------------------------------------
# Prometheus and Pushgateway


class _Metrics(BaseHTTPRequestHandler):
    body = b"# TYPE lora_envtest_value gauge\nlora_envtest_value 42\n"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_prometheus_scrapes_a_local_target(prometheus):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prometheus.set_targets([f"127.0.0.1:{server.server_port}"], labels={"namespace": "envtest"})
        result = prometheus.wait_for('lora_envtest_value{namespace="envtest"}', timeout=30)
        assert result[0]["value"][1] == "42"
        assert result[0]["metric"]["job"] == "pods"
    finally:
        prometheus.set_targets([])
        server.shutdown()
        server.server_close()


def test_prometheus_scrapes_a_pod_on_its_pod_ip(kube_cluster, node_agent, namespace, prometheus):
    code = (
        "import http.server, os\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers()\n"
        "        self.wfile.write(b'lora_train_step{job_name=\"demo\"} 7\\n')\n"
        "http.server.HTTPServer((os.environ['POD_IP'], 9400), H).serve_forever()"
    )
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    create_pod(kube_cluster.api, namespace, python_pod("metrics", code, env=env))
    kube_cluster.api.wait_for(pod_path(namespace, "metrics"), phase_is("Running"), timeout=30)
    ip = node_agent.pod_ip(namespace, "metrics")
    try:
        prometheus.set_targets([f"{ip}:9400"])
        result = prometheus.wait_for('lora_train_step{job_name="demo"}', timeout=30)
        assert result[0]["value"][1] == "7"
        assert result[0]["metric"]["instance"] == f"{ip}:9400"
    finally:
        prometheus.set_targets([])


def test_pushgateway_metric_is_queryable(prometheus, pushgateway):
    body = b"# TYPE lora_envtest_pushed gauge\nlora_envtest_pushed 3.5\n"
    request = urllib.request.Request(
        f"{pushgateway.url}/metrics/job/envtest-batch/instance/run1", data=body, method="PUT"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200
    result = prometheus.wait_for('lora_envtest_pushed{job="envtest-batch"}', timeout=30)
    assert result[0]["value"][1] == "3.5"
    assert result[0]["metric"]["instance"] == "run1"  # honor_labels kept the pushed labels
