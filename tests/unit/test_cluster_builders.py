"""Pure builders of the test environment: argv, configs, paths. Nothing is started here."""

import base64
import json
import os
import re
from pathlib import Path

import pytest

from tests.cluster import certs, controlplane, kubeapi, plugin, procs, prometheus, runtime, s3
from tests.cluster.podspec import ConfigError


def flags(argv):
    return dict(a.split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)


PKI = certs.Pki(
    *(
        certs.KeyPair(Path(f"/p/{n}.crt"), Path(f"/p/{n}.key"))
        for n in ("ca", "apiserver", "admin", "kcm", "kubelet-client")
    ),
    service_account_key=Path("/p/sa.key"),
    service_account_pub=Path("/p/sa.pub"),
)


def test_etcd_listens_on_loopback_only():
    argv = controlplane.etcd_argv("/bin", "/data", 2379, 2380)
    f = flags(argv)
    assert argv[0] == "/bin/etcd"
    assert f["--listen-client-urls"] == "http://127.0.0.1:2379"
    assert f["--listen-peer-urls"] == "http://127.0.0.1:2380"


def test_apiserver_uses_rbac_tls_and_service_account_signing():
    f = flags(controlplane.apiserver_argv("/bin", PKI, "http://127.0.0.1:2379", 6443, "/certs"))
    assert f["--bind-address"] == "127.0.0.1" and f["--secure-port"] == "6443"
    assert f["--authorization-mode"] == "Node,RBAC"
    assert f["--client-ca-file"] == "/p/ca.crt"
    assert f["--service-account-signing-key-file"] == "/p/sa.key"
    assert f["--service-account-key-file"] == "/p/sa.pub"
    assert f["--service-account-issuer"].startswith("https://")
    assert f["--kubelet-certificate-authority"] == "/p/ca.crt"


def test_controller_manager_runs_the_controllers_tests_rely_on():
    f = flags(controlplane.controller_manager_argv("/bin", PKI, "/kcm.kubeconfig", 10257, "/certs"))
    assert f["--bind-address"] == "127.0.0.1"
    assert f["--controllers"] == "*"  # garbagecollector, job, namespace, serviceaccount(-token), nodelifecycle...
    assert f["--service-account-private-key-file"] == "/p/sa.key"
    assert f["--root-ca-file"] == "/p/ca.crt"
    assert f["--use-service-account-credentials"] == "true"
    assert f["--leader-elect"] == "false"


def test_kubeconfig_uses_client_certificates():
    doc = controlplane.kubeconfig("https://127.0.0.1:6443", "/ca", "/c", "/k", "admin")
    assert doc["clusters"][0]["cluster"] == {"server": "https://127.0.0.1:6443", "certificate-authority": "/ca"}
    assert doc["users"][0]["user"] == {"client-certificate": "/c", "client-key": "/k"}
    assert doc["current-context"] == doc["contexts"][0]["name"]


def test_find_bin_dir_prefers_the_environment_variable(tmp_path):
    for tool in controlplane.TOOLS:
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    assert controlplane.find_bin_dir({"LORA_CONTROLPLANE_BIN": str(tmp_path)}) == tmp_path
    (tmp_path / "etcd").unlink()
    with pytest.raises(FileNotFoundError, match="etcd"):
        controlplane.find_bin_dir({"LORA_CONTROLPLANE_BIN": str(tmp_path)})


def test_certificate_extensions():
    text = certs.extensions("serverAuth", ("IP:127.0.0.1", "DNS:localhost"))
    assert "basicConstraints=critical,CA:FALSE" in text
    assert "extendedKeyUsage=serverAuth" in text
    assert "subjectAltName=IP:127.0.0.1,DNS:localhost" in text
    assert "subjectAltName" not in certs.extensions("clientAuth")
    assert certs.subject("admin", "system:masters") == "/CN=admin/O=system:masters"


@pytest.mark.parametrize(
    "args, path",
    [
        (("v1", "pods", "ns", "p", "status"), "/api/v1/namespaces/ns/pods/p/status"),
        (("v1", "nodes"), "/api/v1/nodes"),
        (("batch/v1", "jobs", "ns"), "/apis/batch/v1/namespaces/ns/jobs"),
    ],
)
def test_resource_path(args, path):
    assert kubeapi.resource_path(*args) == path


def test_scrape_config_targets_a_file_and_the_pushgateway_with_honor_labels():
    doc = prometheus.scrape_config("/t/targets.json", "127.0.0.1:9091", "1s")
    pods, push = doc["scrape_configs"]
    assert pods["file_sd_configs"] == [{"files": ["/t/targets.json"], "refresh_interval": "1s"}]
    assert pods["scrape_timeout"] == pods["scrape_interval"] == "1s"
    assert push["honor_labels"] is True
    assert push["static_configs"] == [{"targets": ["127.0.0.1:9091"]}]
    assert doc["global"]["scrape_timeout"] == "1s"  # must not exceed the interval
    assert [j["job_name"] for j in prometheus.scrape_config("/t.json")["scrape_configs"]] == ["pods"]


def test_file_sd():
    assert prometheus.file_sd(["127.0.0.12:9090"], {"namespace": "ns"}) == [
        {"targets": ["127.0.0.12:9090"], "labels": {"namespace": "ns"}}
    ]
    assert prometheus.file_sd([]) == []


def test_weed_binds_every_listener_to_loopback():
    ports = {name: 10000 + i for i, name in enumerate(s3.SeaweedS3.PORT_NAMES)}
    argv = s3.weed_argv("weed", "/data", ports, "/s3.json", "/sock")
    assert "-ip.bind=127.0.0.1" in argv and "-ip=127.0.0.1" in argv
    for name, port in ports.items():
        flag = "-" + name.replace("_grpc", ".port.grpc") if name.endswith("_grpc") else f"-{name}.port"
        assert f"{flag}={port}" in argv, flag
    assert "-s3.port.iceberg=0" in argv and "-s3.port.lance=0" in argv
    assert "-master.telemetry=false" in argv


def test_s3_identities_config():
    doc = s3.identities_config("AK", "SK")
    assert doc["identities"][0]["credentials"] == [{"accessKey": "AK", "secretKey": "SK"}]


@pytest.mark.parametrize("text", ["test_s3_put_get_list", "test_x[gpu-Insufficient nvidia.com/gpu]", "", "A" * 200])
def test_unique_name_is_a_dns_label_and_bucket_name(text):
    name = plugin.unique_name(text, "b", 50)
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name) and 3 <= len(name) <= 50
    assert plugin.unique_name(text) != plugin.unique_name(text)


def test_launcher_argv_carries_a_json_spec():
    argv = procs.launcher_argv(["echo", "hi"], cwd="/w", mounts=[("/a", "/b", True)])
    assert argv[1] == procs.LAUNCHER
    assert json.loads(argv[2]) == {"argv": ["echo", "hi"], "cwd": "/w", "mounts": [["/a", "/b", True]], "cgroup": None}


@pytest.mark.parametrize(
    "mount_path, hidden",
    [
        ("/work", "/work/main/.venv"),
        ("/work/main/.venv", "/work/main/.venv"),
        ("/", "/work/main/.venv"),
        ("/workspace", None),
        ("/tmp", None),
        ("/data", None),
    ],
)
def test_mounts_that_would_hide_the_environment(mount_path, hidden):
    assert runtime.hides(mount_path, ["/work/main/.venv"]) == hidden


def test_container_mounts_order_parents_first_and_create_nested_mountpoints(tmp_path):
    vol_a, vol_b, term = tmp_path / "a", tmp_path / "b", tmp_path / "term"
    vol_a.mkdir(), vol_b.mkdir(), term.write_text("")
    target = tmp_path / "root" / "data"
    container = {
        "volumeMounts": [
            {"name": "b", "mountPath": f"{target}/config", "readOnly": True},
            {"name": "a", "mountPath": str(target)},
        ],
        "terminationMessagePath": str(tmp_path / "root" / "termination-log"),
    }
    created = []
    mounts = runtime.container_mounts(container, {"a": vol_a, "b": vol_b}, term, created)
    assert mounts == [
        (str(vol_a), str(target), False),
        (str(term), str(tmp_path / "root" / "termination-log"), False),
        (str(vol_b), f"{target}/config", True),
    ]
    assert (vol_a / "config").is_dir()  # nested mount point made inside the parent volume
    assert target.is_dir() and (tmp_path / "root" / "termination-log").is_file()
    assert created[0] == tmp_path / "root"
    with pytest.raises(runtime.MountConflict):
        runtime.container_mounts(container, {"a": vol_a, "b": vol_b}, term, [], protected=[str(target / "x")])


def secret(data):
    return {"data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def test_volume_files_for_configmap_secret_projected_and_downward_api():
    objects = {
        ("ConfigMap", "ns", "cfg"): {"train.yaml": b"rank: 4\n", "other": b"x"},
        ("Secret", "ns", "creds"): runtime.decode_data(secret({"key": b"s3cr3t"}), "Secret"),
    }
    lookup = lambda kind, ns, name: objects.get((kind, ns, name))  # noqa: E731
    pod = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {}}
    token = lambda audience, seconds: f"token-for-{audience}"  # noqa: E731
    cfg = {"configMap": {"name": "cfg", "items": [{"key": "train.yaml", "path": "conf/train.yaml"}]}}
    assert runtime.volume_files(pod, cfg, lookup, token, "127.0.0.9") == {"conf/train.yaml": b"rank: 4\n"}
    assert runtime.volume_files(pod, {"secret": {"secretName": "creds"}}, lookup, token, "ip") == {"key": b"s3cr3t"}
    projected = {
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "audience": "api"}},
                {"configMap": {"name": "cfg", "items": [{"key": "other", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
            ]
        }
    }
    assert runtime.volume_files(pod, projected, lookup, token, "ip") == {
        "token": b"token-for-api",
        "ca.crt": b"x",
        "namespace": b"ns",
    }
    with pytest.raises(ConfigError, match='configmap "absent" not found'):
        runtime.volume_files(pod, {"configMap": {"name": "absent"}}, lookup, token, "ip")
    assert runtime.volume_files(pod, {"configMap": {"name": "absent", "optional": True}}, lookup, token, "ip") == {}


def test_decode_data():
    assert runtime.decode_data({"data": {"a": "x"}, "binaryData": {"b": "eQ=="}}, "ConfigMap") == {"a": b"x", "b": b"y"}
    assert runtime.decode_data({"data": {"a": "eA=="}, "stringData": {"s": "t"}}, "Secret") == {"a": b"x", "s": b"t"}
    assert runtime.decode_data(None, "Secret") is None


def test_oom_kill_is_read_from_the_cgroup(tmp_path):
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert runtime.MemoryCgroups.oom_killed(tmp_path)
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert not runtime.MemoryCgroups.oom_killed(tmp_path)
    assert not runtime.MemoryCgroups.oom_killed(None)


def test_reap_stale_removes_only_dirs_of_dead_agents(tmp_path):
    import os

    dead = subprocess_pid_that_exited()
    (tmp_path / f"lora-node-agent-{dead}-abc123" / "pod").mkdir(parents=True)
    (tmp_path / f"lora-node-agent-{os.getpid()}-def456").mkdir()
    (tmp_path / "unrelated").mkdir()
    runtime.reap_stale(tmp_path, cgroup_parents=[])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"lora-node-agent-{os.getpid()}-def456", "unrelated"]


def subprocess_pid_that_exited():
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_log_tails_for_failure_reports_skip_chatter(tmp_path):
    log = tmp_path / "kcm.log"
    log.write_text("".join(f"line {i}\n" + 'I ... "Namespace has been deleted" namespace="t-x"\n' for i in range(5)))
    assert procs.tail(log, 3, skip=("Namespace has been deleted",)) == "line 2\nline 3\nline 4"
    assert procs.tail(log, 2).count("Namespace has been deleted") == 1
    assert procs.tail(tmp_path / "missing.log") == ""


def test_killing_a_container_kills_the_processes_that_left_its_group(tmp_path):
    """A crash or the end of a grace period kills the whole container, as a cgroup kill does: also the
    processes in sessions of their own (torch's elastic agent starts its workers so)."""
    import subprocess

    run = runtime.ContainerRun({"name": "trainer"}, tmp_path)
    script = "setsid sleep 300 & echo $! > worker.pid; sleep 300"
    run.proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, start_new_session=True)
    procs.wait_until(lambda: (tmp_path / "worker.pid").exists() and procs.descendants(run.proc.pid), 10, "a worker")
    worker = int((tmp_path / "worker.pid").read_text())
    assert os.getpgid(worker) != os.getpgid(run.proc.pid) and worker in procs.descendants(run.proc.pid)
    run.kill()

    def alive(pid):  # a zombie (state Z) is dead: it only waits for init to reap it
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    procs.wait_until(lambda: not alive(worker), 10, "the worker killed with its container")
