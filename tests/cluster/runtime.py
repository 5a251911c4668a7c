"""The node agent's container runtime: volumes on disk, processes, memory cgroups, container state.

A pod is a directory:  <workdir>/pods/<namespace>_<name>_<uid>/
  volumes/<volume>/     emptyDir, configMap, secret, projected, downwardAPI contents
  termination/<c>       the file each container sees at its terminationMessagePath
  etc-hosts             the pod's /etc/hosts (kept current by the agent: cluster DNS of its subdomain)
  home/ tmp/ cwd/       HOME, TMPDIR and default working directory of its processes
  logs/<c>-<n>.log      stdout+stderr of a container's n-th run (kept for `kubectl logs`)

Each container process runs under `unshare --mount --uts --propagation private`, and the launcher
sets the pod's host name and bind-mounts the pod's volumes (and its /etc/hosts) at their mountPath
inside that private mount namespace, so two pods can mount different things at the same path and
nothing leaks to the host's mount table or host name.
"""

import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.cluster import podspec
from tests.cluster.procs import descendants, kill_group, launcher_argv

DEFAULT_TERMINATION_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE = 4096
HOSTS_PATH = "/etc/hosts"


def now_rfc3339():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------
# Volumes


def _write_tree(directory, files, mode):
    """Write {relative path: bytes} under `directory` (replacing what was there)."""
    for rel, content in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)


def _key_files(data, items, name, kind, optional):
    """Files for a configMap/secret source: every key, or only `items` (key -> path)."""
    if data is None:
        if optional:
            return {}
        raise podspec.ConfigError(f'{"secret" if kind == "Secret" else "configmap"} "{name}" not found')
    if not items:
        return dict(data)
    files = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise podspec.ConfigError(f"configmap references non-existent config key: {item['key']}")
        files[item["path"]] = data[item["key"]]
    return files


def _downward_files(pod, items, pod_ip):
    return {
        item["path"]: podspec.field_value(pod, item["fieldRef"]["fieldPath"], pod_ip, "127.0.0.1").encode()
        for item in items or []
        if "fieldRef" in item
    }


def volume_files(pod, volume, lookup_bytes, request_token, pod_ip):
    """{relative path: bytes} for a file-backed volume (configMap, secret, downwardAPI, projected)."""
    namespace = pod["metadata"]["namespace"]
    if "configMap" in volume:
        src = volume["configMap"]
        return _key_files(
            lookup_bytes("ConfigMap", namespace, src["name"]),
            src.get("items"),
            src["name"],
            "ConfigMap",
            src.get("optional"),
        )
    if "secret" in volume:
        src = volume["secret"]
        return _key_files(
            lookup_bytes("Secret", namespace, src["secretName"]),
            src.get("items"),
            src["secretName"],
            "Secret",
            src.get("optional"),
        )
    if "downwardAPI" in volume:
        return _downward_files(pod, volume["downwardAPI"].get("items"), pod_ip)
    files = {}
    for source in volume["projected"].get("sources") or []:
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            files[token["path"]] = request_token(token.get("audience"), token.get("expirationSeconds", 3600)).encode()
        elif "configMap" in source or "secret" in source:
            files.update(volume_files(pod, source, lookup_bytes, request_token, pod_ip))
        elif "downwardAPI" in source:
            files.update(_downward_files(pod, source["downwardAPI"].get("items"), pod_ip))
    return files


def prepare_volumes(pod, pod_dir, lookup_bytes, request_token, pod_ip):
    """Materialize the pod's volumes; returns {volume name: host path}. Raises ConfigError."""
    paths = {}
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        target = pod_dir / "volumes" / name
        if "emptyDir" in volume:
            target.mkdir(parents=True, exist_ok=True)
        elif "hostPath" in volume:
            target = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                target.mkdir(parents=True, exist_ok=True)
        elif any(k in volume for k in ("configMap", "secret", "downwardAPI", "projected")):
            files = volume_files(pod, volume, lookup_bytes, request_token, pod_ip)
            mode = next(
                (
                    volume[k].get("defaultMode")
                    for k in ("configMap", "secret", "downwardAPI", "projected")
                    if k in volume and volume[k].get("defaultMode") is not None
                ),
                0o644,
            )
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            _write_tree(target, files, mode)
        else:
            kind = next((k for k in volume if k != "name"), "?")
            raise podspec.ConfigError(f"volume {name!r}: type {kind} is not supported by the test node agent")
        paths[name] = target
    return paths


def write_in_place(path, text):
    """Rewrite a file keeping its inode (True when it changed): a bind mount of it (a pod's /etc/hosts)
    keeps showing the file, where a rename would leave the mount on the old one."""
    path = Path(path)
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        path.write_bytes(data)
        return True
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()
    return True


def host_location(target, mounts):
    """Where `target` really lives when the earlier (shallower) `mounts` are in place."""
    for source, mount_target, _ in reversed(mounts):
        if target == mount_target or target.startswith(mount_target.rstrip("/") + "/"):
            return str(Path(source) / os.path.relpath(target, mount_target))
    return target


def ensure_mountpoint(path, is_dir, created):
    """Create a missing mount point (recording what was made in `created` for cleanup)."""
    p = Path(path)
    if p.exists():
        return
    missing = []
    parent = p.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for d in reversed(missing):
        d.mkdir()
        created.append(d)
    if is_dir:
        p.mkdir()
    else:
        p.touch()
    created.append(p)


class MountConflict(Exception):
    """A mountPath would hide what the local 'image' needs (CreateContainerError)."""


def hides(mount_path, protected):
    """The first protected host path that a mount at `mount_path` would shadow, or None."""
    mount_path = os.path.normpath(mount_path)
    for path in protected:
        path = os.path.normpath(str(path))
        if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
            return path
    return None


def container_mounts(container, volume_paths, termination_file, created, protected=(), hosts_file=None):
    """Bind mounts [(source, target, read_only)] for a container, parents before children.

    Containers share the host's root filesystem, so a mount over a directory holding the Python
    environment, the repository or the pod directories would break the process: MountConflict.
    `hosts_file`: the pod's /etc/hosts (none for hostNetwork pods, which see the host's).
    """
    wanted = []
    for m in container.get("volumeMounts") or []:
        hidden = hides(m["mountPath"], protected)
        if hidden:
            raise MountConflict(
                f"mountPath {m['mountPath']} would hide {hidden}, which the test node agent "
                "runs containers from; mount the volume somewhere else"
            )
        source = Path(volume_paths[m["name"]])
        if m.get("subPath"):
            source = source / m["subPath"]
            if not source.exists():
                source.mkdir(parents=True)
        wanted.append((str(source), m["mountPath"].rstrip("/") or "/", bool(m.get("readOnly"))))
    wanted.append((str(termination_file), container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH, False))
    if hosts_file is not None and not any(target == HOSTS_PATH for _, target, _ in wanted):
        wanted.append((str(hosts_file), HOSTS_PATH, False))
    wanted.sort(key=lambda m: m[1].count("/"))
    mounts = []
    for source, target, read_only in wanted:
        ensure_mountpoint(host_location(target, mounts), os.path.isdir(source), created)
        mounts.append((source, target, read_only))
    return mounts


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(pods_parent, cgroup_parents=None):
    """Remove pod directories and memory cgroups left by agents that were SIGKILLed.

    Both are named lora-node-agent-<pid>[-...]; those whose pid is gone are removed.
    `cgroup_parents` defaults to this process's memory cgroup.
    """
    if cgroup_parents is None:
        cgroup_parents = [r.parent for r in MemoryCgroups._candidates("x")]
    roots = [Path(pods_parent), *cgroup_parents]
    for root in roots:
        for path in root.glob("lora-node-agent-*"):
            match = re.match(r"lora-node-agent-(\d+)", path.name)
            if not match or pid_alive(int(match.group(1))):
                continue
            if str(path).startswith("/sys/fs/cgroup/"):
                for child in [c for c in path.iterdir() if c.is_dir()]:
                    MemoryCgroups.remove(child)
                MemoryCgroups.remove(path)
            else:
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Memory cgroups (limits.memory and reason OOMKilled)


class MemoryCgroups:
    """Per-container memory cgroups below the agent's own cgroup; inert where none can be made."""

    def __init__(self, root=None):
        self.root = root

    @classmethod
    def detect(cls, name):
        for root in cls._candidates(name):
            try:
                root.mkdir(exist_ok=True)
                return cls(root)
            except OSError:
                continue
        return cls(None)

    @staticmethod
    def _candidates(name):
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                out.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / name)
        return out  # cgroup v2 needs delegation; without it limits are simply not enforced

    def create(self, name, limit_bytes):
        if self.root is None or not limit_bytes:
            return None
        path = self.root / name
        try:
            path.mkdir(exist_ok=True)
            (path / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
            return path
        except OSError:
            return None

    @staticmethod
    def oom_killed(path):
        try:
            text = (Path(path) / "memory.oom_control").read_text()
        except (OSError, TypeError):
            return False
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "oom_kill":
                return int(parts[1]) > 0
        return False

    @staticmethod
    def remove(path):
        if path is None:
            return
        for _ in range(20):
            try:
                Path(path).rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)

    def close(self):
        if self.root is not None:
            for child in list(self.root.iterdir()) if self.root.exists() else []:
                if child.is_dir():
                    self.remove(child)
            self.remove(self.root)


# ---------------------------------------------------------------------------------------------
# Containers


class ContainerRun:
    """One container of a pod on this node: its process and the status the kubelet reports."""

    def __init__(self, spec, pod_dir, init=False):
        self.spec = spec
        self.name = spec["name"]
        self.init = init
        self.pod_dir = pod_dir
        self.proc = None
        self.cgroup = None
        self.state = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state = {}
        self.restart_count = 0
        self.runs = 0
        self.not_before = 0.0  # monotonic time of the next start attempt (back-off)
        self.failed_pull_at = None
        self.pull_failures = 0
        self.lost = False  # its process died with the node (NodeAgent.crash)
        self.termination_file = pod_dir / "termination" / self.name

    @property
    def running(self):
        return self.proc is not None

    @property
    def done(self):
        return "terminated" in self.state

    def log_path(self, run=None):
        return self.pod_dir / "logs" / f"{self.name}-{self.runs if run is None else run}.log"

    def set_waiting(self, reason, message=None):
        self.state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}

    def start(self, argv, env, cwd, mounts, cgroups, unshare, hostname=None):
        """Start the process (stdout+stderr to a fresh log file), in its own UTS namespace named `hostname`
        when one is given."""
        self.runs += 1
        self.termination_file.parent.mkdir(parents=True, exist_ok=True)
        self.termination_file.write_bytes(b"")
        limit = (self.spec.get("resources") or {}).get("limits", {}).get("memory")
        self.cgroup = cgroups.create(
            f"{self.pod_dir.name}_{self.name}", podspec.parse_quantity(limit) if limit else None
        )
        log = self.log_path()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    unshare,
                    "--mount",
                    *(["--uts"] if hostname else []),
                    "--propagation",
                    "private",
                    "--",
                    *launcher_argv(
                        argv,
                        cwd=cwd,
                        mounts=mounts,
                        cgroup=str(self.cgroup) if self.cgroup else None,
                        hostname=hostname,
                    ),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.state = {"running": {"startedAt": now_rfc3339()}}

    def poll(self):
        """The exit code when the process has ended (128+signal for a signal), else None."""
        code = self.proc.poll() if self.proc else None
        if code is None:
            return None
        return code if code >= 0 else 128 - code

    def signal(self, sig):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def kill(self):
        """SIGKILL every process of the container, as the kernel does to a cgroup (a crash, the end of the
        grace period): the process group and the descendants that left it, then reap it."""
        if self.proc is not None:
            tree = descendants(self.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            kill_group(self.proc, timeout=5)

    def finish(self, exit_code, reason=None, message=None, cgroups=None):
        """Record the end of the current run as state.terminated."""
        oom = cgroups is not None and cgroups.oom_killed(self.cgroup)
        if reason is None:
            reason = "OOMKilled" if oom else ("Completed" if exit_code == 0 else "Error")
        if message is None:
            message = self.termination_message(exit_code)
        started = self.state.get("running", {}).get("startedAt")
        terminated = {"exitCode": exit_code, "reason": reason, "finishedAt": now_rfc3339()}
        if started:
            terminated["startedAt"] = started
        if message:
            terminated["message"] = message
        self.state = {"terminated": terminated}
        if self.proc is not None:
            self.kill()  # stragglers in its process group
        self.proc = None
        if cgroups is not None:
            cgroups.remove(self.cgroup)
        self.cgroup = None

    def termination_message(self, exit_code):
        try:
            text = self.termination_file.read_bytes()[:MAX_TERMINATION_MESSAGE].decode("utf-8", "replace")
        except OSError:
            text = ""
        if not text and exit_code != 0 and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            try:
                lines = self.log_path().read_bytes()[-2048:].decode("utf-8", "replace").splitlines()
            except OSError:
                lines = []
            text = "\n".join(lines[-80:])
        return text

    def restart_later(self, delay):
        """Keep the last run as lastState and wait `delay` seconds in CrashLoopBackOff."""
        self.last_state = self.state
        self.restart_count += 1
        self.not_before = time.monotonic() + delay
        self.set_waiting("CrashLoopBackOff", f"back-off {delay:g}s restarting failed container={self.name}")

    def status(self, image_id=""):
        started = "running" in self.state
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": image_id,
            "containerID": f"local://{self.pod_dir.name}/{self.name}/{self.runs}" if self.runs else "",
            "ready": started,
            "started": started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }


def decode_data(obj, kind):
    """{key: bytes} of a ConfigMap (data + binaryData) or Secret (base64 data + stringData)."""
    if obj is None:
        return None
    if kind == "Secret":
        out = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
        return out
    out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out
