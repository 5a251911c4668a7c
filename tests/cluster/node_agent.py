"""A local node agent standing in for the kubelet of one node (and for kube-scheduler).

It registers a Node, renews its Lease, runs each container's command as a local process (see
runtime.py for volumes and mounts) with the pod's host name and an /etc/hosts that answers what cluster
DNS would for the pod's subdomain, reports pod and container status as a kubelet does, deletes pods
gracefully, and serves container logs to the API server so `kubectl logs` works. One agent of the
cluster (schedule=True, the default) also binds pending pods to the node that fits them best among all
Nodes (resources, nodeSelector and affinity, taints; least allocated first), so several agents make a
cluster of several nodes.

Images map to commands in this environment (podspec.DEFAULT_IMAGES); an unknown image, or a pod
annotated `node-agent.lora-operator.io/image-pull-error: "true"`, waits in ErrImagePull /
ImagePullBackOff like a real image that cannot be pulled.

Test hooks: evict() (DisruptionTarget, then termination), crash() / recover() (processes killed,
node NotReady, then back), mark_out_of_service() (the non-graceful node shutdown taint: the control
plane fails and removes the dead node's pods). Everything runs in daemon threads (pod and Service
watches, the sync loop, the heartbeat); every API call has a timeout and the watches reconnect on
their own.
"""

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

from tests.cluster import podspec, runtime
from tests.cluster.kubeapi import ApiError, resource_path
from tests.cluster.kubelet_logs import LogServer
from tests.cluster.procs import wait_until

IMAGE_PULL_ERROR_ANNOTATION = "node-agent.lora-operator.io/image-pull-error"
OUT_OF_SERVICE_TAINT = {"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}
TERMINAL = ("Succeeded", "Failed")
DEFAULT_ALLOCATABLE = {
    "cpu": "16",
    "memory": "64Gi",
    "nvidia.com/gpu": "2",
    "pods": "110",
    "ephemeral-storage": "100Gi",
}
KUBELET_VERSION = "v1.34.4"
REPO = Path(__file__).resolve().parents[2]


def micro_time():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def is_deleting(pod):
    return bool(pod["metadata"].get("deletionTimestamp"))


def pod_key(pod):
    return pod["metadata"]["namespace"], pod["metadata"]["name"]


class PodInformer:
    """Keeps {uid: object} of a cluster-wide collection (pods by default) current with list + watch; sets
    `changed` on every event (pass one Event to several informers to wake one loop)."""

    def __init__(self, api, log, watch_timeout=30, path="/api/v1/pods", changed=None):
        self.api = api
        self.log = log
        self.watch_timeout = watch_timeout
        self.path = path
        self.pods = {}  # uid -> object (pods, or whatever `path` lists)
        self.synced = threading.Event()
        self.changed = changed or threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"node-agent-watch{path}", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2)

    def snapshot(self):
        with self._lock:
            return list(self.pods.values())

    def _relist(self):
        listing = self.api.get(self.path)
        with self._lock:
            self.pods = {p["metadata"]["uid"]: p for p in listing.get("items", [])}
        self.synced.set()
        self.changed.set()
        return listing["metadata"]["resourceVersion"]

    def _run(self):
        backoff = 0.2
        while not self._stop.is_set():
            try:
                rv = self._relist()
                while not self._stop.is_set():
                    for kind, obj in self.api.watch(self.path, rv, timeout_seconds=self.watch_timeout):
                        rv = obj["metadata"].get("resourceVersion", rv)
                        self._apply(kind, obj)
                        if self._stop.is_set():
                            return
                backoff = 0.2
            except ApiError as e:
                if e.status != 410:
                    self.log.warning("watch %s: %s", self.path, e)
            except Exception as e:  # noqa: BLE001 - connection errors of all kinds; reconnect
                if not self._stop.is_set():
                    self.log.warning("watch %s failed, reconnecting: %r", self.path, e)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 2.0)

    def _apply(self, kind, obj):
        if kind == "BOOKMARK":
            return
        uid = obj["metadata"]["uid"]
        with self._lock:
            if kind == "DELETED":
                self.pods.pop(uid, None)
            else:
                self.pods[uid] = obj
        self.changed.set()


class PodRun:
    """A pod this node runs: its IP, directory, containers and what was last reported."""

    def __init__(self, pod, ip, pod_dir):
        self.uid = pod["metadata"]["uid"]
        self.namespace, self.name = pod_key(pod)
        self.ip = ip
        self.dir = pod_dir
        spec = pod["spec"]
        self.init_containers = [runtime.ContainerRun(c, pod_dir, init=True) for c in spec.get("initContainers") or []]
        self.containers = [runtime.ContainerRun(c, pod_dir) for c in spec["containers"]]
        self.start_time = runtime.now_rfc3339()
        self.started_mono = time.monotonic()
        self.volumes = None  # {name: host path} once prepared
        self.volume_error = None
        self.volume_retry_at = 0.0
        self.stop_reason = None  # (reason, message, condition) when the kubelet ends the pod itself
        self.kill_deadline = None  # monotonic deadline once SIGTERM was sent
        self.finished = False
        self.reported = None
        self.transitions = {}  # condition type -> (status, lastTransitionTime)
        self.events = set()
        # the pod's /etc/hosts (hostNetwork pods see the host's); rewritten as its subdomain's pods change
        self.hosts_file = None if spec.get("hostNetwork") else pod_dir / "etc-hosts"
        self.hostname = None if spec.get("hostNetwork") else podspec.pod_hostname(pod)
        self.hosts_text = None  # what hosts_file holds

    @property
    def all_containers(self):
        return self.init_containers + self.containers

    def running_containers(self):
        return [c for c in self.all_containers if c.running]

    def find(self, name):
        return next((c for c in self.all_containers if c.name == name), None)


class NodeAgent:
    """The node: scheduler + kubelet for pods in this cluster. See the module docstring.

    Parameters: api (KubeClient), pki (certs.Pki, for the log endpoint's serving certificate),
    workdir (agent log, copies of container logs), name, allocatable (dict of quantities), labels,
    taints, images (image -> entrypoint table), image_env (extra environment every container
    gets), backoff / backoff_max (restart back-off in seconds; the kubelet's 10 s / 300 s are
    shortened for tests), pods_dir (where pod directories live; outside /tmp by default so a pod
    may mount an emptyDir at /tmp; $LORA_NODE_AGENT_PODS_DIR changes the parent), ip_prefix (pod IPs
    are <ip_prefix>.10-254: give each node of a cluster its own, e.g. 127.0.0 and 127.0.2), schedule
    (whether this agent is the cluster's scheduler: exactly one agent of a cluster should be),
    cluster_domain (of the DNS names in pods' /etc/hosts).
    """

    def __init__(
        self,
        api,
        pki,
        workdir,
        name="local-node",
        allocatable=None,
        labels=None,
        taints=None,
        images=podspec.DEFAULT_IMAGES,
        image_env=None,
        backoff=1.0,
        backoff_max=10.0,
        tick=0.2,
        pods_dir=None,
        ip_prefix="127.0.0",
        schedule=True,
        cluster_domain="cluster.local",
    ):
        self.api = api
        self.pki = pki
        self.workdir = Path(workdir)
        parent = Path(os.environ.get("LORA_NODE_AGENT_PODS_DIR", "/var/tmp"))
        self.pods_dir = Path(pods_dir or parent / f"lora-node-agent-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        # what containers run from: a mount over any of these would break them (see runtime.hides)
        self.protected = tuple(dict.fromkeys([sys.prefix, sys.base_prefix, str(REPO), str(self.pods_dir)]))
        self.name = name
        self.allocatable = {**DEFAULT_ALLOCATABLE, **(allocatable or {})}
        self.labels = labels or {}
        self.taints = taints or []
        self.images = images
        self.image_env = image_env or {}
        self.backoff, self.backoff_max, self.tick = backoff, backoff_max, tick
        self.log_path = self.workdir / "node-agent.log"
        self.ip_prefix, self.schedule, self.cluster_domain = ip_prefix, schedule, cluster_domain
        self.log = self._make_logger()
        self.informer = PodInformer(api, self.log)
        self.services = PodInformer(api, self.log, path="/api/v1/services", changed=self.informer.changed)
        self.runs = {}  # uid -> PodRun
        self.crashed = False
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread = None
        self._heartbeat_thread = None
        self._bound = {}  # uid -> (node, requests) of pods bound but not yet seen bound in the cache
        self._deleting = {}  # uid -> monotonic time of the last final delete request
        self._next_ip = 10
        self._node_cache = (0.0, None)
        self._nodes_cache = (0.0, [])
        self._created_paths = []  # mount points made on the host, removed on stop
        self.cgroups = runtime.MemoryCgroups(None)  # made in start()
        self._stopped = False
        self.unshare = shutil.which("unshare")
        self.venv_bin = str(Path(sys.executable).parent)
        self.log_server = None

    def _make_logger(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        logger = logging.getLogger(f"node-agent.{self.name}.{id(self)}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        handler = logging.FileHandler(self.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        return logger

    # -----------------------------------------------------------------------------------------
    # lifecycle

    def start(self, timeout=60):
        if self.unshare is None:
            raise RuntimeError("the node agent needs util-linux `unshare` (and root) for pod mounts")
        runtime.reap_stale(self.pods_dir.parent)
        self.cgroups = runtime.MemoryCgroups.detect(f"lora-node-agent-{os.getpid()}-{self.name}")
        atexit.register(self.stop)
        try:
            self.log_server = LogServer(self).start()
            self._register_node()
            self.informer.start()
            self.services.start()
            self._thread = threading.Thread(target=self._loop, name="node-agent", daemon=True)
            self._thread.start()
            self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="node-agent-lease", daemon=True)
            self._heartbeat_thread.start()
            wait_until(self.informer.synced.is_set, timeout, "the node agent's pod list")
            wait_until(self.services.synced.is_set, timeout, "the node agent's Service list")
            wait_until(self._node_ready_untainted, timeout, f"node {self.name} Ready without not-ready taint")
        except BaseException:
            self.stop()
            raise
        self.log.info("node %s ready", self.name)
        return self

    def stop(self):
        """Kill every pod process and remove what the agent made; idempotent (also run at exit)."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        self._stopping.set()
        self.informer.changed.set()
        try:
            for thread in (self._thread, self._heartbeat_thread):
                if thread:
                    thread.join(timeout=30)
            self.informer.stop()
            self.services.stop()
        finally:  # even when Ctrl-C lands in a join: no processes, mounts points or dirs left
            with self._lock:
                for uid in list(self.runs):
                    self._forget(uid)
            shutil.rmtree(self.pods_dir, ignore_errors=True)
            if self.log_server:
                self.log_server.stop()
            self.cgroups.close()
            for path in reversed(self._created_paths):
                with contextlib.suppress(OSError):
                    path.rmdir() if path.is_dir() else path.unlink()
            self._created_paths.clear()

    def _loop(self):
        while not self._stopping.is_set():
            self.informer.changed.wait(self.tick)
            self.informer.changed.clear()
            if self._stopping.is_set():
                return
            try:
                with self._lock:
                    self._sync_once()
            except Exception:  # noqa: BLE001 - keep the node alive; the log tells what broke
                self.log.error("sync failed:\n%s", traceback.format_exc())
                self._stopping.wait(0.5)

    def _sync_once(self):
        pods = self.informer.snapshot()
        self._schedule(pods)
        if not self.crashed:
            self._sync_pods(pods)

    def _heartbeat_loop(self, period=1.0, status_every=5):
        """Renew the node Lease every `period` s (the heartbeat kube-controller-manager watches) and,
        like a kubelet, post Ready again when the node controller marked the node Unknown meanwhile
        (after an API server outage, say). Nothing while crashed."""
        beats = 0
        while not self._stopping.wait(period):
            if self.crashed:
                continue
            beats += 1
            try:
                self.api.patch(
                    resource_path("coordination.k8s.io/v1", "leases", "kube-node-lease", self.name),
                    {"spec": {"renewTime": micro_time(), "holderIdentity": self.name}},
                )
                if beats % status_every == 0 and self.node_ready() != "True" and not self.crashed:
                    self.log.info("node was marked %s; posting Ready", self.node_ready())
                    self._post_node_status(ready=True)
            except Exception as e:  # noqa: BLE001 - a missed beat is retried next period
                self.log.warning("heartbeat failed: %r", e)

    # -----------------------------------------------------------------------------------------
    # node registration and heartbeat

    def node_object(self):
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **self.labels,
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels},
            "spec": {"taints": self.taints},
        }

    def node_status(self, ready=True):
        now = runtime.now_rfc3339()
        if ready:
            conditions = [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
                {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure"},
                {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID"},
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                },
            ]
        else:
            conditions = [
                {
                    "type": t,
                    "status": "Unknown",
                    "reason": "NodeStatusUnknown",
                    "message": "Kubelet stopped posting node status.",
                }
                for t in ("MemoryPressure", "DiskPressure", "PIDPressure", "Ready")
            ]
        for c in conditions:
            c.update(lastHeartbeatTime=now, lastTransitionTime=now)
        return {
            "capacity": self.allocatable,
            "allocatable": self.allocatable,
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port}},
            "nodeInfo": {
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "local://node-agent",
                "osImage": "lora-operator test node agent",
                "kernelVersion": os.uname().release,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    def _register_node(self):
        path = resource_path("v1", "nodes", name=self.name)
        try:
            self.api.create(resource_path("v1", "nodes"), self.node_object())
        except ApiError as e:
            if e.status != 409:
                raise
            self.api.patch(
                path,
                {"metadata": {"labels": self.node_object()["metadata"]["labels"]}, "spec": {"taints": self.taints}},
            )
        self._post_node_status(ready=True)
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": micro_time()},
        }
        try:
            self.api.create(resource_path("coordination.k8s.io/v1", "leases", "kube-node-lease"), lease)
        except ApiError as e:
            if e.status != 409:
                raise

    def _post_node_status(self, ready):
        self.api.patch(
            resource_path("v1", "nodes", name=self.name, subresource="status"),
            {"status": self.node_status(ready)},
            "strategic",
        )

    def node(self, max_age=1.0):
        fetched, node = self._node_cache
        if node is None or time.monotonic() - fetched > max_age:
            node = self.api.get(resource_path("v1", "nodes", name=self.name))
            self._node_cache = (time.monotonic(), node)
        return node

    def _node_ready_untainted(self):
        node = self.node(max_age=0)
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
        tainted = any(t["key"].startswith("node.kubernetes.io/") for t in node["spec"].get("taints") or [])
        return ready and not tainted

    # -----------------------------------------------------------------------------------------
    # scheduling

    def nodes(self, max_age=1.0):
        """Every Node of the cluster (the scheduler's view), read at most every `max_age` seconds."""
        fetched, nodes = self._nodes_cache
        if not nodes or time.monotonic() - fetched > max_age:
            nodes = self.api.get(resource_path("v1", "nodes")).get("items") or []
            self._nodes_cache = (time.monotonic(), nodes)
        return nodes

    def _schedule(self, pods):
        if not self.schedule:
            return
        unbound = {p["metadata"]["uid"] for p in pods if not p["spec"].get("nodeName")}
        self._bound = {uid: b for uid, b in self._bound.items() if uid in unbound}  # cache lag only
        pending = [
            p
            for p in pods
            if not p["spec"].get("nodeName")
            and not is_deleting(p)
            and p["metadata"]["uid"] not in self._bound
            and p.get("status", {}).get("phase", "Pending") == "Pending"
            and p["spec"].get("schedulerName", "default-scheduler") == "default-scheduler"
        ]
        if not pending:
            return
        nodes = self.nodes()
        used = {}  # node name -> summed requests of its non-terminal pods
        for p in pods:
            if p["spec"].get("nodeName") and p.get("status", {}).get("phase") not in TERMINAL:
                podspec.add_requests(used.setdefault(p["spec"]["nodeName"], {}), podspec.pod_requests(p["spec"]))
        for node_name, requests in self._bound.values():
            podspec.add_requests(used.setdefault(node_name, {}), requests)
        pending.sort(key=lambda p: (-(p["spec"].get("priority") or 0), p["metadata"]["creationTimestamp"]))
        for pod in pending:
            node_name, message = podspec.choose_node(pod, nodes, used)
            if node_name is None:
                self._mark_unschedulable(pod, message)
            elif self._bind(pod, node_name):
                requests = podspec.pod_requests(pod["spec"])
                self._bound[pod["metadata"]["uid"]] = (node_name, requests)
                podspec.add_requests(used.setdefault(node_name, {}), requests)

    def _bind(self, pod, node_name):
        ns, name = pod_key(pod)
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": pod["metadata"]["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node_name},
        }
        try:
            self.api.create(resource_path("v1", "pods", ns, name, "binding"), body)
        except ApiError as e:
            if e.status in (404, 409):
                return False
            raise
        self.log.info("bound %s/%s to %s", ns, name, node_name)
        self._event(
            pod, "Scheduled", f"Successfully assigned {ns}/{name} to {node_name}", component="default-scheduler"
        )
        return True

    def _mark_unschedulable(self, pod, message):
        current = next((c for c in pod.get("status", {}).get("conditions") or [] if c["type"] == "PodScheduled"), {})
        if current.get("reason") == "Unschedulable" and current.get("message") == message:
            return
        ns, name = pod_key(pod)
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastTransitionTime": runtime.now_rfc3339(),
            "lastProbeTime": None,
        }
        try:
            self.api.patch(
                resource_path("v1", "pods", ns, name, "status"),
                {"metadata": {"uid": pod["metadata"]["uid"]}, "status": {"conditions": [condition]}},
                "strategic",
            )
        except ApiError as e:
            if e.status not in (404, 409):
                raise
            return
        self._event(pod, "FailedScheduling", message, "Warning", component="default-scheduler")

    # -----------------------------------------------------------------------------------------
    # kubelet: pods on this node

    def _sync_pods(self, pods):
        mine = {p["metadata"]["uid"]: p for p in pods if p["spec"].get("nodeName") == self.name}
        for uid, pod in mine.items():
            run = self.runs.get(uid)
            if is_deleting(pod):
                self._terminate(pod, run)
                continue
            if run is None:
                if pod.get("status", {}).get("phase") in TERMINAL:
                    continue  # finished before this agent knew it
                run = self.runs[uid] = self._admit(pod)
            self._write_hosts(pod, run, pods)
            self._sync_run(pod, run)
        for uid in set(self.runs) - set(mine):
            self._forget(uid)

    def _write_hosts(self, pod, run, pods):
        """The pod's /etc/hosts, with the DNS records of its subdomain's pods as they get IPs (what a kubelet
        and cluster DNS give a pod together); rewritten in place, so running containers see the change."""
        if run.hosts_file is None or run.finished:
            return
        ips = {r.uid: r.ip for r in self.runs.values()}
        text = podspec.hosts_file(pod, run.ip, pods, self.services.snapshot(), self.cluster_domain, ips)
        if text != run.hosts_text and runtime.write_in_place(run.hosts_file, text):
            self.log.info("%s/%s: /etc/hosts updated", run.namespace, run.name)
        run.hosts_text = text

    def _admit(self, pod):
        ns, name = pod_key(pod)
        ip = "127.0.0.1" if pod["spec"].get("hostNetwork") else self._allocate_ip()
        pod_dir = self.pods_dir / f"{ns}_{name}_{pod['metadata']['uid'][:8]}"
        for sub in ("home", "tmp", "cwd", "logs", "termination"):
            (pod_dir / sub).mkdir(parents=True, exist_ok=True)
        self.log.info("admitted %s/%s ip=%s dir=%s", ns, name, ip, pod_dir)
        return PodRun(pod, ip, pod_dir)

    def _allocate_ip(self):
        used = {r.ip for r in self.runs.values()}
        for _ in range(245):
            ip = f"{self.ip_prefix}.{self._next_ip}"
            self._next_ip = 10 if self._next_ip >= 254 else self._next_ip + 1
            if ip not in used:
                return ip
        raise RuntimeError(f"no free pod IP in {self.ip_prefix}.10-254")

    def _forget(self, uid):
        """Drop a pod that is gone from the API: kill leftovers, keep its logs, remove its directory."""
        run = self.runs.pop(uid)
        for c in run.running_containers():
            c.kill()
        for c in run.all_containers:
            self.cgroups.remove(c.cgroup)
        if (run.dir / "logs").is_dir():
            shutil.copytree(run.dir / "logs", self.workdir / "pod-logs" / run.dir.name, dirs_exist_ok=True)
        shutil.rmtree(run.dir, ignore_errors=True)
        self.log.info("forgot %s/%s", run.namespace, run.name)

    def _sync_run(self, pod, run):
        if run.finished:
            return
        if run.volumes is None and not self._prepare_volumes(pod, run):
            self._report(pod, run)
            return
        if run.stop_reason is None:
            self._check_deadline(pod, run)
        if run.stop_reason is not None:
            self._stop_run(pod, run)
            return
        policy = pod["spec"].get("restartPolicy", "Always")
        init_ok = True
        for c in run.init_containers:
            if c.done and c.state["terminated"]["exitCode"] == 0:
                continue
            self._step(pod, run, c, policy)
            init_ok = False
            break
        if init_ok:
            for c in run.containers:
                self._step(pod, run, c, policy)
        else:
            for c in run.containers:
                c.set_waiting("PodInitializing")
        self._report(pod, run)

    def _prepare_volumes(self, pod, run):
        if time.monotonic() < run.volume_retry_at:
            return False
        run.volume_retry_at = time.monotonic() + 0.5
        try:
            run.volumes = runtime.prepare_volumes(
                pod, run.dir, self._lookup_bytes, lambda aud, exp: self._token(pod, aud, exp), run.ip
            )
            return True
        except (podspec.ConfigError, ApiError) as e:
            message = f"MountVolume.SetUp failed: {getattr(e, 'message', None) or e}"
            if message != run.volume_error:
                run.volume_error = message
                self._event(pod, "FailedMount", message, "Warning")
            return False

    def _check_deadline(self, pod, run):
        deadline = pod["spec"].get("activeDeadlineSeconds")
        if deadline and time.monotonic() - run.started_mono > deadline:
            run.stop_reason = (
                "DeadlineExceeded",
                "Pod was active on the node longer than the specified deadline",
                None,
            )

    def _step(self, pod, run, c, policy):
        """Advance one container: notice its exit, restart it after back-off, or start it."""
        if c.running:
            code = c.poll()
            if code is None:
                return
            c.finish(code, cgroups=self.cgroups)
            self.log.info("%s/%s container %s exited %s", run.namespace, run.name, c.name, code)
            self._after_exit(pod, run, c, policy)
            return
        if c.done or time.monotonic() < c.not_before:
            if c.failed_pull_at and time.monotonic() - c.failed_pull_at > 1.0:
                c.set_waiting("ImagePullBackOff", f'Back-off pulling image "{c.spec.get("image")}"')
            return
        self._start(pod, run, c, policy)

    def _after_exit(self, pod, run, c, policy):
        code = c.state["terminated"]["exitCode"]
        restart = policy == "Always" and not c.init or (policy != "Never" and code != 0)
        if restart:
            delay = min(self.backoff * 2**c.restart_count, self.backoff_max)
            c.restart_later(delay)
            self._event(pod, "BackOff", f"Back-off restarting failed container {c.name}", "Warning")

    def _start(self, pod, run, c, policy):
        image = c.spec.get("image", "")
        entrypoint = podspec.image_entrypoint(image, self.images)
        if entrypoint is None or (pod["metadata"].get("annotations") or {}).get(IMAGE_PULL_ERROR_ANNOTATION) == "true":
            c.set_waiting(
                "ErrImagePull",
                f'failed to pull and unpack image "{image}": not found '
                "(the test node agent has no mapping for this image)",
            )
            c.failed_pull_at = time.monotonic()
            c.not_before = time.monotonic() + min(self.backoff * 2 ** min(c.pull_failures, 8), self.backoff_max)
            c.pull_failures += 1
            self._event(pod, "Failed", f'Failed to pull image "{image}"', "Warning", once=f"pull-{c.name}")
            return
        c.failed_pull_at = None
        try:
            env = podspec.container_env(
                pod,
                c.spec,
                self._lookup_text,
                run.ip,
                base=self._base_env(pod, run, image),
                node_allocatable=self.allocatable,
            )
        except (podspec.ConfigError, ApiError) as e:
            message = getattr(e, "message", None) or str(e)
            c.set_waiting("CreateContainerConfigError", message)
            c.not_before = time.monotonic() + 1
            self._event(pod, "Failed", f"Error: {message}", "Warning", once=f"config-{c.name}-{message}")
            return
        argv = podspec.container_argv(c.spec, entrypoint, env)
        if not argv or shutil.which(argv[0], path=env.get("PATH")) is None:
            c.finish(
                128,
                "StartError",
                f'failed to create containerd task: exec: "{argv[0] if argv else ""}": '
                "executable file not found in $PATH",
            )
            self._after_exit(pod, run, c, policy)
            return
        try:
            mounts = runtime.container_mounts(
                c.spec, run.volumes, c.termination_file, self._created_paths, self.protected, run.hosts_file
            )
        except runtime.MountConflict as e:
            c.set_waiting("CreateContainerError", str(e))
            c.not_before = time.monotonic() + self.backoff_max
            self._event(pod, "Failed", f"Error: {e}", "Warning", once=f"mount-{c.name}")
            return
        cwd = c.spec.get("workingDir") or str(run.dir / "cwd")
        if c.spec.get("workingDir"):
            runtime.ensure_mountpoint(runtime.host_location(cwd, mounts), True, self._created_paths)
        c.start(argv, env, cwd, mounts, self.cgroups, self.unshare, hostname=run.hostname)
        self.log.info("%s/%s started %s: %s (pid %s)", run.namespace, run.name, c.name, argv, c.proc.pid)
        self._event(pod, "Started", f"Started container {c.name}", once=f"started-{c.name}-{c.runs}")

    def _base_env(self, pod, run, image=""):
        """The environment of the 'image', before the pod's env: PATH with the image's own programs and this
        venv first, etc."""
        host, port = self.api.host, self.api.port
        path = [
            *podspec.image_bin_dirs(image),
            self.venv_bin,
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ]
        return {
            "PATH": ":".join(path),
            "HOME": str(run.dir / "home"),
            "TMPDIR": str(run.dir / "tmp"),
            "LANG": "C.UTF-8",
            "HOSTNAME": podspec.pod_hostname(pod) if not pod["spec"].get("hostNetwork") else socket.gethostname(),
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": str(port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
            **self.image_env,
        }

    def _lookup_object(self, kind, namespace, name):
        plural = "secrets" if kind == "Secret" else "configmaps"
        try:
            return self.api.get(resource_path("v1", plural, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def _lookup_text(self, kind, namespace, name):
        data = runtime.decode_data(self._lookup_object(kind, namespace, name), kind)
        return None if data is None else {k: v.decode("utf-8", "replace") for k, v in data.items()}

    def _lookup_bytes(self, kind, namespace, name):
        return runtime.decode_data(self._lookup_object(kind, namespace, name), kind)

    def _token(self, pod, audience, expiration):
        ns, name = pod_key(pod)
        sa = pod["spec"].get("serviceAccountName") or "default"
        spec = {
            "expirationSeconds": max(int(expiration), 600),
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": name, "uid": pod["metadata"]["uid"]},
        }
        if audience:
            spec["audiences"] = [audience]
        answer = self.api.create(
            resource_path("v1", "serviceaccounts", ns, sa, "token"),
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return answer["status"]["token"]

    # -----------------------------------------------------------------------------------------
    # termination: deletion, eviction by the kubelet, deadlines

    def _signal_all(self, pod, run):
        """SIGTERM every running container once and set the SIGKILL deadline."""
        if run.kill_deadline is not None:
            return
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        run.kill_deadline = time.monotonic() + grace
        for c in run.running_containers():
            c.signal(signal.SIGTERM)
            self._event(pod, "Killing", f"Stopping container {c.name}", once=f"kill-{c.name}")
        self.log.info("%s/%s: SIGTERM, grace %ss", run.namespace, run.name, grace)

    def _reap(self, run):
        """True when no container runs any more; SIGKILLs the rest after the deadline."""
        for c in run.running_containers():
            code = c.poll()
            if code is not None:
                c.finish(code, cgroups=self.cgroups)
        if run.running_containers() and time.monotonic() < run.kill_deadline:
            return False
        for c in run.running_containers():
            c.kill()
            code = c.poll()
            c.finish(137 if code is None else code, cgroups=self.cgroups)
        for c in run.containers:  # never started, or waiting to restart: what a kubelet reports
            if not c.done:
                c.finish(
                    137, "ContainerStatusUnknown", "The container could not be located when the pod was terminated"
                )
        return True

    def _stop_run(self, pod, run):
        """The kubelet ends the pod itself (eviction, deadline): Failed with a reason; not deleted."""
        self._signal_all(pod, run)
        if not self._reap(run):
            return
        reason, message, condition = run.stop_reason
        self._report(pod, run, phase="Failed", reason=reason, message=message, extra_condition=condition)
        self._event(pod, reason, message, "Warning")

    def _terminate(self, pod, run):
        """Graceful deletion: SIGTERM, wait the grace period, SIGKILL, report, delete with grace 0."""
        uid = pod["metadata"]["uid"]
        if run is not None and not run.finished:
            self._signal_all(pod, run)
            if not self._reap(run):
                return
            statuses = [c.status() for c in run.containers]
            failed = any(s["state"].get("terminated", {}).get("exitCode", 0) != 0 for s in statuses)
            self._report(pod, run, phase="Failed" if failed else "Succeeded")
        last = self._deleting.get(uid, 0)
        if time.monotonic() - last < 2:
            return
        self._deleting[uid] = time.monotonic()
        ns, name = pod_key(pod)
        try:
            self.api.delete(resource_path("v1", "pods", ns, name), grace_period_seconds=0, uid=uid)
            self.log.info("deleted %s/%s", ns, name)
        except ApiError as e:
            if e.status not in (404, 409):
                raise

    # -----------------------------------------------------------------------------------------
    # status

    def _condition(self, run, ctype, ok, reason=None, message=None):
        status = "True" if ok else "False"
        previous = run.transitions.get(ctype)
        if previous is None or previous[0] != status:
            run.transitions[ctype] = (status, runtime.now_rfc3339())
        condition = {
            "type": ctype,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": run.transitions[ctype][1],
        }
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        return condition

    def pod_status(self, pod, run, phase=None, reason=None, message=None, extra_condition=None):
        """The status a kubelet would report for `run` (phase computed unless given)."""
        statuses = [c.status() for c in run.containers]
        init_statuses = [c.status() for c in run.init_containers]
        init_done = all(s["state"].get("terminated", {}).get("exitCode") == 0 for s in init_statuses)
        policy = pod["spec"].get("restartPolicy", "Always")
        if phase is None:
            init_failed = policy == "Never" and any(
                s["state"].get("terminated", {}).get("exitCode", 0) != 0 for s in init_statuses
            )
            phase = "Failed" if init_failed else (podspec.pod_phase(policy, statuses) if init_done else "Pending")
        unready = [s["name"] for s in statuses if not s["ready"]]
        completed = phase in TERMINAL
        ready_reason = "PodCompleted" if completed else ("ContainersNotReady" if unready else None)
        ready_message = None if completed or not unready else f"containers with unready status: [{' '.join(unready)}]"
        incomplete = [s["name"] for s in init_statuses if s["state"].get("terminated", {}).get("exitCode") != 0]
        conditions = [
            self._condition(run, "PodReadyToStartContainers", run.volumes is not None),
            self._condition(
                run,
                "Initialized",
                init_done,
                None if init_done else "ContainersNotInitialized",
                None if init_done else f"containers with incomplete status: [{' '.join(incomplete)}]",
            ),
            self._condition(run, "Ready", not unready and not completed, ready_reason, ready_message),
            self._condition(run, "ContainersReady", not unready and not completed, ready_reason, ready_message),
        ]
        if extra_condition:
            conditions.append(extra_condition)
        status = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": run.start_time,
            "containerStatuses": statuses,
        }
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        if reason:
            status["reason"], status["message"] = reason, message
        return status

    def _report(self, pod, run, **kwargs):
        status = self.pod_status(pod, run, **kwargs)
        if status != run.reported:
            ns, name = pod_key(pod)
            try:
                self.api.patch(
                    resource_path("v1", "pods", ns, name, "status"),
                    {"metadata": {"uid": run.uid}, "status": status},
                    "strategic",
                )
                run.reported = status
            except ApiError as e:
                if e.status not in (404, 409):
                    raise
        # a terminal phase is final (nothing restarts any more), once reported: a report that failed (the API
        # server away) is sent again on the next sync
        if status["phase"] in TERMINAL and not run.running_containers():
            run.finished = True

    def _event(self, pod, reason, message, kind="Normal", component="kubelet", once=None):
        """Record a core/v1 Event about `pod` (best effort; `once` dedupes per run)."""
        run = self.runs.get(pod["metadata"]["uid"])
        if once and run is not None:
            if once in run.events:
                return
            run.events.add(once)
        ns, name = pod_key(pod)
        now = runtime.now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": ns},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": ns,
                "name": name,
                "uid": pod["metadata"]["uid"],
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": component, "host": self.name},
            "reportingComponent": component,
            "reportingInstance": self.name,
        }
        try:
            self.api.create(resource_path("v1", "events", ns), event)
        except Exception as e:  # noqa: BLE001 - events are best effort
            self.log.warning("event %s for %s/%s not recorded: %s", reason, ns, name, e)

    # -----------------------------------------------------------------------------------------
    # test hooks

    def log_tails(self, lines=60, pods=6):
        """The agent's log and the newest container logs of the pods it runs (failure reports)."""
        from tests.cluster.procs import tail

        tails = {"node-agent" if self.name == "local-node" else f"node-agent {self.name}": tail(self.log_path, lines)}
        with self._lock:
            runs = list(self.runs.values())[-pods:]
        for run in runs:
            for c in run.all_containers:
                if c.runs:
                    tails[f"pod {run.namespace}/{run.name} container {c.name}"] = tail(c.log_path(), 20)
        return tails

    def repair(self):
        """Recover after a test left the node crashed."""
        if self.crashed:
            self.recover()

    def pod_ip(self, namespace, name):
        """The loopback IP given to a pod on this node (None when it does not run here)."""
        with self._lock:
            run = self._run_for(namespace, name)
            return run.ip if run else None

    def _run_for(self, namespace, name):
        return next((r for r in self.runs.values() if (r.namespace, r.name) == (namespace, name)), None)

    def find_container(self, namespace, name, container=None):
        """The runtime.ContainerRun of a pod on this node (its first container unless named), or None."""
        with self._lock:
            run = self._run_for(namespace, name)
            if run is None:
                return None
            return run.find(container) if container else run.containers[0]

    def container_log(self, namespace, name, container=None, previous=False):
        """The stdout+stderr of a container (the first one unless named); '' when none."""
        c = self.find_container(namespace, name, container)
        path = c.log_path(c.runs - 1 if previous else None) if c else None
        try:
            return path.read_text(errors="replace") if path else ""
        except OSError:
            return ""

    def evict(self, namespace, name, reason="EvictionByEvictionAPI", message=None):
        """Evict a pod as Kubernetes does; returns at once (watch the pod to see it happen).

        EvictionByEvictionAPI: the real Eviction API (the API server adds the DisruptionTarget
        condition and deletes the pod gracefully). PreemptionByScheduler: DisruptionTarget, then a
        graceful delete, as kube-scheduler preempts. TerminationByKubelet: node-pressure eviction;
        the pod ends Failed with reason Evicted and stays.
        """
        path = resource_path("v1", "pods", namespace, name)
        if reason == "EvictionByEvictionAPI":
            self.api.create(
                path + "/eviction",
                {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}},
            )
            return
        condition = {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": reason,
            "lastTransitionTime": runtime.now_rfc3339(),
            "lastProbeTime": None,
        }
        if reason == "PreemptionByScheduler":
            condition["message"] = message or "default-scheduler: preempting to accommodate a higher priority pod"
            self.api.patch(path + "/status", {"status": {"conditions": [condition]}}, "strategic")
            self.api.delete(path)
            return
        if reason != "TerminationByKubelet":
            raise ValueError(f"unknown eviction reason {reason!r}")
        condition["message"] = message or "The node was low on resource: memory."
        with self._lock:
            run = self._run_for(namespace, name)
            if run is None:
                raise LookupError(f"pod {namespace}/{name} does not run on {self.name}")
            run.stop_reason = ("Evicted", condition["message"], condition)
        self.informer.changed.set()

    def node_ready(self):
        """The node's Ready condition status as the API server has it ('True', 'False', 'Unknown')."""
        node = self.node(max_age=0)
        return next((c["status"] for c in node["status"].get("conditions", []) if c["type"] == "Ready"), None)

    def crash(self, wait=True, timeout=60):
        """Simulate a node crash: every pod process is SIGKILLed and the node stops heartbeating
        and reporting status. kube-controller-manager's node lifecycle controller then does what it
        does to a dead node (~10 s): Ready=Unknown, unreachable taints, pods Ready=False, and after
        the pods' tolerationSeconds (300 s by default) their eviction. With wait=True this returns
        once Ready is Unknown. Scheduling continues (it is not the node's job)."""
        with self._lock:
            self.crashed = True
            for run in self.runs.values():
                for c in run.running_containers():
                    c.kill()
                    c.proc = None
                    c.lost = True
        self.log.info("node crashed")
        if wait:
            wait_until(lambda: self.node_ready() == "Unknown", timeout, f"node {self.name} NotReady")

    def mark_out_of_service(self):
        """What an administrator does for a node that is gone for good (Kubernetes' non-graceful node
        shutdown): taint it node.kubernetes.io/out-of-service:NoExecute. The taint eviction controller then
        deletes its pods (DisruptionTarget: DeletionByTaintManager) and, the node being NotReady, the pod
        garbage collector marks them Failed and removes them (within its 20 s period), so their
        controllers replace them elsewhere. Use after crash(); recover() removes the taint."""
        self._set_taint(OUT_OF_SERVICE_TAINT, present=True)

    def _set_taint(self, taint, present):
        """Add or remove one taint, keeping the node lifecycle controller's (read, modify, write with the
        resourceVersion; retried on a conflict)."""

        def attempt():
            node = self.node(max_age=0)
            taints = [t for t in node["spec"].get("taints") or [] if t.get("key") != taint["key"]]
            if present:
                taints.append(dict(taint))
            if taints == (node["spec"].get("taints") or []):
                return True
            try:
                self.api.patch(
                    resource_path("v1", "nodes", name=self.name),
                    {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]}, "spec": {"taints": taints}},
                )
            except ApiError as e:
                if e.status == 409:
                    return False
                raise
            return True

        wait_until(attempt, 30, f"taint {taint['key']} {'on' if present else 'off'} node {self.name}")

    def delete_node(self):
        """Remove this agent's Node and Lease from the cluster (after stop(): a node that left for good)."""
        for path in (
            resource_path("v1", "nodes", name=self.name),
            resource_path("coordination.k8s.io/v1", "leases", "kube-node-lease", self.name),
        ):
            try:
                self.api.delete(path)
            except ApiError as e:
                if e.status != 404:
                    raise

    def recover(self, wait=True, timeout=60):
        """Bring the node back: lost containers end as ContainerStatusUnknown (exit 137) and are
        restarted or not by the pod's restartPolicy; the node posts Ready again (and loses the
        out-of-service taint, as an administrator removes it). With wait=True this returns once the
        node is Ready and its unreachable/not-ready taints are gone."""
        self._set_taint(OUT_OF_SERVICE_TAINT, present=False)
        with self._lock:
            for run in self.runs.values():
                for c in run.all_containers:
                    if c.lost:
                        c.lost = False
                        c.finish(
                            137,
                            "ContainerStatusUnknown",
                            "The container could not be located when the pod was terminated",
                        )
                        pod = self.informer.pods.get(run.uid)
                        if pod is not None:
                            self._after_exit(pod, run, c, pod["spec"].get("restartPolicy", "Always"))
            self._post_node_status(ready=True)
            self.crashed = False
        self.informer.changed.set()
        self.log.info("node recovered")
        if wait:
            wait_until(self._node_ready_untainted, timeout, f"node {self.name} Ready and untainted")
