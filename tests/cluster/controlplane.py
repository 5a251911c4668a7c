"""etcd + kube-apiserver + kube-controller-manager on 127.0.0.1, built from tests/controlplane.

`KubeCluster(workdir).start()` generates a PKI, starts the three servers on free ports, waits until
each is healthy, and writes an admin kubeconfig. The argv builders are pure functions so their
flags are unit-tested and readable in one place.
"""

import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path

from tests.cluster import certs
from tests.cluster.kubeapi import KubeClient
from tests.cluster.procs import Service, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tests" / "controlplane" / "build.sh"
TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Controllers a test may meet. Everything kube-controller-manager runs by default ("*"), which
# includes garbagecollector, job, namespace, serviceaccount, serviceaccount-token,
# root-ca-certificate-publisher, node-lifecycle, taint-eviction-controller and pod-garbage-collector.
CONTROLLERS = "*"
START_TIMEOUT = 120  # seconds; kube-apiserver needs ~10-30 s on a busy 2-core machine


def find_bin_dir(env=os.environ):
    """The directory holding the control-plane binaries.

    $LORA_CONTROLPLANE_BIN wins (prebuilt binaries); otherwise tests/controlplane/build.sh prints
    its cache directory, building first when the cache is cold (15-25 min once).
    """
    if env.get("LORA_CONTROLPLANE_BIN"):
        bin_dir = Path(env["LORA_CONTROLPLANE_BIN"])
    else:
        out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, capture_output=True, text=True, timeout=3600)
        bin_dir = Path(out.stdout.strip().splitlines()[-1])
    missing = [t for t in TOOLS if not os.access(bin_dir / t, os.X_OK)]
    if missing:
        raise FileNotFoundError(f"{bin_dir} lacks {', '.join(missing)}")
    return bin_dir


def etcd_argv(bin_dir, data_dir, client_port, peer_port):
    client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    return [
        str(Path(bin_dir) / "etcd"),
        "--name=default",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--unsafe-no-fsync",  # test data; saves seconds of fsync on a slow disk
        "--log-level=warn",
    ]


def apiserver_argv(bin_dir, pki, etcd_url, port, cert_dir):
    return [
        str(Path(bin_dir) / "kube-apiserver"),
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={pki.apiserver.cert}",
        f"--tls-private-key-file={pki.apiserver.key}",
        f"--client-ca-file={pki.ca.cert}",
        "--authorization-mode=Node,RBAC",
        f"--service-account-issuer={SA_ISSUER}",
        f"--service-account-key-file={pki.service_account_pub}",
        f"--service-account-signing-key-file={pki.service_account_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--endpoint-reconciler-type=none",  # 127.0.0.1 is not a valid Endpoints address
        "--allow-privileged=true",
        "--enable-priority-and-fairness=false",
        "--profiling=false",
        f"--kubelet-client-certificate={pki.apiserver_kubelet_client.cert}",
        f"--kubelet-client-key={pki.apiserver_kubelet_client.key}",
        f"--kubelet-certificate-authority={pki.ca.cert}",
        "--kubelet-preferred-address-types=InternalIP",
        "--v=1",
    ]


def controller_manager_argv(bin_dir, pki, kubeconfig, port, cert_dir):
    return [
        str(Path(bin_dir) / "kube-controller-manager"),
        f"--kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",
        f"--controllers={CONTROLLERS}",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.service_account_key}",
        f"--root-ca-file={pki.ca.cert}",
        f"--cluster-signing-cert-file={pki.ca.cert}",
        f"--cluster-signing-key-file={pki.ca.key}",
        # A node whose agent stops heartbeating (NodeAgent.crash) turns NotReady in seconds.
        "--node-monitor-period=1s",
        "--node-monitor-grace-period=10s",
        "--kube-api-qps=100",
        "--kube-api-burst=200",
        "--concurrent-gc-syncs=5",
        "--v=1",
    ]


def kubeconfig(server, ca_file, cert_file, key_file, user="admin"):
    """A kubeconfig document (dict) using client-certificate authentication."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lora-test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert_file), "client-key": str(key_file)}}],
        "contexts": [{"name": "lora-test", "context": {"cluster": "lora-test", "user": user}}],
        "current-context": "lora-test",
    }


class KubectlError(subprocess.CalledProcessError):
    def __str__(self):
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


class KubeCluster:
    """A running control plane.

    Attributes: server (https URL), kubeconfig (admin kubeconfig path), bin_dir, logs (directory
    with etcd.log, kube-apiserver.log, kube-controller-manager.log), pki (certs.Pki), api
    (a KubeClient authenticated as admin).
    """

    def __init__(self, workdir, bin_dir=None):
        self.workdir = Path(workdir)
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.logs = self.workdir / "logs"
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.server = None
        self.pki = None
        self.api = None
        self.services = []

    def start(self):
        self.bin_dir = self.bin_dir or find_bin_dir()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pki = certs.make_pki(self.workdir / "pki")
        try:
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_etcd(self):
        port = free_port()
        self.etcd_url = f"http://127.0.0.1:{port}"
        etcd = self._service("etcd", etcd_argv(self.bin_dir, self.workdir / "etcd", port, free_port()))
        wait_until(lambda: etcd.check_running() or _http_ok(f"{self.etcd_url}/health"), START_TIMEOUT, "etcd /health")

    def _start_apiserver(self):
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        apiserver = self._service(
            "kube-apiserver",
            apiserver_argv(self.bin_dir, self.pki, self.etcd_url, port, self.workdir / "apiserver-certs"),
        )
        self._write_kubeconfig(self.kubeconfig, self.pki.admin, "admin")
        self.api = KubeClient(self.server, self.pki.ca.cert, self.pki.admin.cert, self.pki.admin.key)
        wait_until(
            lambda: apiserver.check_running() or self.api.get_raw("/readyz") == "ok",
            START_TIMEOUT,
            "kube-apiserver /readyz",
        )

    def stop_apiserver(self):
        """Stop kube-apiserver (an API outage begins); etcd and kube-controller-manager keep running."""
        self._apiserver().stop(timeout=3)

    def start_apiserver(self):
        """Start kube-apiserver again on the same port with the same certificates; waits for /readyz."""
        apiserver = self._apiserver().start()
        wait_until(
            lambda: apiserver.check_running() or self.api.get_raw("/readyz") == "ok",
            START_TIMEOUT,
            "kube-apiserver /readyz after restart",
        )

    def restart_apiserver(self):
        """Stop kube-apiserver and start it again on the same port (an API outage); waits for /readyz."""
        self.stop_apiserver()
        self.start_apiserver()

    def _apiserver(self):
        return next(s for s in self.services if s.name == "kube-apiserver")

    def _start_controller_manager(self):
        port = free_port()
        path = self.workdir / "controller-manager.kubeconfig"
        self._write_kubeconfig(path, self.pki.controller_manager, "system:kube-controller-manager")
        kcm = self._service(
            "kube-controller-manager",
            controller_manager_argv(self.bin_dir, self.pki, path, port, self.workdir / "controller-manager-certs"),
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE  # self-signed serving cert
        wait_until(
            lambda: kcm.check_running() or _http_ok(f"https://127.0.0.1:{port}/healthz", insecure),
            START_TIMEOUT,
            "kube-controller-manager /healthz",
        )

    def _service(self, name, argv):
        service = Service(name, argv, self.logs / f"{name}.log").start()
        self.services.append(service)
        return service

    def _write_kubeconfig(self, path, pair, user):
        path.write_text(json.dumps(kubeconfig(self.server, self.pki.ca.cert, pair.cert, pair.key, user), indent=2))

    def kubectl(self, *args, check=True, input=None, timeout=60):
        """Run the built kubectl against this cluster; returns CompletedProcess (text, captured)."""
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *map(str, args)]
        out = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise KubectlError(out.returncode, argv, out.stdout, out.stderr)
        return out

    def log_tails(self, lines=40):
        """{component: last lines of its log} for failure reports, without the chatter of namespaces that
        earlier tests deleted (it filled the controller-manager's tail and hid what mattered)."""
        return {s.name: s.log_tail(lines, skip=("Namespace has been deleted",)) for s in self.services}

    def stop(self):
        # kube-apiserver stops listening at once but lingers ~10 s on SIGTERM; 3 s is plenty here
        for service in reversed(self.services):
            service.stop(timeout=3)
        self.services = []

    def remove(self):
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _http_ok(url, context=None):
    with urllib.request.urlopen(url, timeout=5, context=context) as r:
        return r.status == 200
