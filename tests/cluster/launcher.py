"""Exec a command after a little setup; the one program every test-environment process starts through.

Usage: python launcher.py '<json spec>'

spec keys (all optional except argv):
  argv:   the command to exec (PATH lookup uses the environment this process was given)
  cwd:    working directory
  mounts: [[source, target, read_only], ...] bind mounts; the caller must already have put this
          process in a private mount namespace (`unshare --mount --propagation private`), so the
          mounts are seen by this process tree only
  cgroup: a cgroup directory to join before exec (memory limits, OOM detection)
  hostname: the host name to set; the caller must already have put this process in its own UTS
          namespace (`unshare --uts`), as a container runtime gives each pod its own

The parent-death signal is set first, so a killed test run (even SIGKILL) takes its servers and pod
processes with it. The process id stays the same through every exec, so the caller's Popen handle
and signals reach the final program. Standard library only: this file runs before anything else.
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def set_parent_death_signal():
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        sys.exit(1)


def bind_mount(source, target, read_only):
    subprocess.run(["mount", "--bind", source, target], check=True)
    if read_only:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)


def main(argv):
    spec = json.loads(argv[1])
    set_parent_death_signal()
    if spec.get("cgroup"):
        with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if spec.get("hostname"):
        socket.sethostname(spec["hostname"])
    for source, target, read_only in spec.get("mounts", []):
        bind_mount(source, target, read_only)
    if spec.get("cwd"):
        os.chdir(spec["cwd"])
    command = spec["argv"]
    try:
        os.execvp(command[0], command)
    except OSError as e:
        print(f"exec {command[0]!r} failed: {e}", file=sys.stderr)
        sys.exit(128)


if __name__ == "__main__":
    main(sys.argv)
