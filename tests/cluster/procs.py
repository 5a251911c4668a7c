"""Processes, ports and bounded waits shared by every service of the test environment."""

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LAUNCHER = str(Path(__file__).with_name("launcher.py"))

_live = set()  # every Service started and not yet stopped; atexit stops leftovers
_atexit_registered = False


def free_port(host="127.0.0.1"):
    """A TCP port that was free on `host` a moment ago (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout, what, interval=0.2):
    """Call `predicate` until it returns something truthy and return that; TimeoutError after `timeout` s.

    Exceptions from the predicate count as "not yet"; the last one is named in the timeout message.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - "not ready yet" takes many shapes
            last = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def launcher_argv(argv, cwd=None, mounts=(), cgroup=None, hostname=None):
    """The argv that runs `argv` through launcher.py (parent-death signal, mounts, cgroup, host name)."""
    spec = {"argv": list(argv), "cwd": cwd, "mounts": [list(m) for m in mounts], "cgroup": cgroup}
    if hostname:
        spec["hostname"] = hostname
    return [sys.executable, LAUNCHER, json.dumps(spec)]


def tail(path, lines=60, skip=()):
    """The last `lines` lines of a text file that contain none of `skip` ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    kept = [line for line in text.splitlines() if not any(s in line for s in skip)]
    return "\n".join(kept[-lines:])


def _stop_leftovers():
    for service in list(_live):
        service.stop(timeout=3)


class Service:
    """A long-running server process writing to its own log file; stop() is idempotent."""

    def __init__(self, name, argv, log_path, env=None, cwd=None):
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.proc = None

    def start(self):
        global _atexit_registered
        if self.running:
            return self
        if not _atexit_registered:
            atexit.register(_stop_leftovers)
            _atexit_registered = True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} starting: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                launcher_argv(self.argv, cwd=self.cwd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        _live.add(self)
        return self

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def check_running(self):
        """Raise with the log's tail when the process has exited (used inside readiness waits)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; log tail:\n{tail(self.log_path)}")

    def stop(self, timeout=10):
        """SIGTERM the process group, SIGKILL it after `timeout` seconds."""
        _live.discard(self)
        if self.proc is None:
            return
        kill_group(self.proc, timeout)
        self.proc = None

    def log_tail(self, lines=60, skip=()):
        return tail(self.log_path, lines, skip)


def descendants(pid):
    """Every live process below `pid`, read from /proc (children that started sessions of their own, as
    torch's elastic agent starts its workers, are outside the group that killpg reaches)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_group(proc, timeout):
    """Terminate a process started with start_new_session=True and everything in its group."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # stragglers that outlived the group leader
        os.killpg(proc.pid, signal.SIGKILL)
