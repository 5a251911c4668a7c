"""Several training processes on one or more nodes: `lora-train` as PyTorch's elastic launcher.

    lora-train --config cfg.yaml --nproc-per-node 4                     # one node, four processes
    lora-train --config cfg.yaml --nnodes 2 --nproc-per-node 8 --node-rank 0 --rdzv-endpoint host0:29400

torch.distributed's elastic agent (what torchrun runs) starts the workers, which are `lora-train` again
with RANK, WORLD_SIZE and LOCAL_RANK set; the nodes meet at a c10d rendezvous on node 0. When a worker
fails, the agents stop every worker of every node and start them again from the newest checkpoint, up to
--max-restarts times; a worker's permanent error (docs/architecture.md, "Exit codes") ends the launch at once
instead, as restarting cannot help. The operator sets the LORA_* variables below instead of flags.

A container has one termination message: the workers write theirs into a folder, and the launcher passes
on the main process's (or the first failed worker's), and exits with its code, so the permanent exit codes
of docs/architecture.md survive the launcher.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from .errors import ExitCode
from .termination import WORKER_REPORTS_ENV, TerminationReport

log = logging.getLogger("lora_trainer")

FLAGS = {  # flag -> (environment variable the operator sets, default)
    "nproc_per_node": ("LORA_NPROC_PER_NODE", 1),
    "nnodes": ("LORA_NNODES", 1),
    "node_rank": ("LORA_NODE_RANK", 0),
    "rdzv_endpoint": ("LORA_RDZV_ENDPOINT", ""),
    "rdzv_id": ("LORA_RDZV_ID", ""),
    "max_restarts": ("LORA_MAX_RESTARTS", 0),
}
RENDEZVOUS_PORT = 29400  # torchrun's default c10d port
# how long nodes wait for each other at the rendezvous: a node that cannot be scheduled in this time
# makes the others give up (exit non-zero) instead of holding their GPUs
JOIN_TIMEOUT_SECONDS = 600
# after SIGTERM the workers write a checkpoint and upload it (sigterm_grace_seconds, 25 by default) before
# the agent kills what is left
SHUTDOWN_TIMEOUT_SECONDS = 60
SHARED_STORE_OPT_OUT = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes (PyTorch elastic launch; LORA_* variables as defaults)")
    group.add_argument("--nproc-per-node", "--nproc", type=int, help="training processes on this node (GPUs)")
    group.add_argument("--nnodes", type=int, help="nodes of the run")
    group.add_argument("--node-rank", type=int, help="this node's index; node 0 hosts the rendezvous")
    group.add_argument("--rdzv-endpoint", help=f"host:port of node 0's rendezvous (port {RENDEZVOUS_PORT})")
    group.add_argument("--rdzv-id", help="the run's id, the same on every node")
    group.add_argument("--max-restarts", type=int, help="group restarts after a worker failure")


def settings(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> dict:
    """The launch settings: flags, else the operator's variables, else one process."""
    out = {}
    for name, (variable, default) in FLAGS.items():
        value = getattr(args, name, None)
        if value is None:
            value = type(default)(env[variable]) if env.get(variable) else default
        out[name] = value
    return out


def wanted(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process launches workers: more than one process, and not a worker itself."""
    s = settings(args, env)
    return s["nproc_per_node"] * s["nnodes"] > 1 and "RANK" not in env


def worker_argv(argv: list[str]) -> list[str]:
    """The command line without the launch flags: what each worker runs."""
    flags = {"--nproc-per-node", "--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id", "--max-restarts"}
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in flags:
            skip = "=" not in item
            continue
        out.append(item)
    return out


def launch_config(s: dict):
    from torch.distributed.launcher.api import LaunchConfig

    single = s["nnodes"] == 1
    return LaunchConfig(
        min_nodes=s["nnodes"],
        max_nodes=s["nnodes"],
        nproc_per_node=s["nproc_per_node"],
        run_id=s["rdzv_id"] or uuid.uuid4().hex,
        rdzv_backend="c10d",
        # one node: a store on a free local port (torchrun --standalone); several: node 0 hosts it
        rdzv_endpoint="localhost:0" if single else s["rdzv_endpoint"],
        rdzv_configs={"is_host": single or s["node_rank"] == 0, "join_timeout": JOIN_TIMEOUT_SECONDS},
        max_restarts=s["max_restarts"],
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
    )


def run(args: argparse.Namespace, argv: list[str], report: TerminationReport) -> int:
    """Starts the workers and waits for them; returns the exit code the container should end with."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    s = settings(args)
    if s["nnodes"] > 1 and not s["rdzv_endpoint"]:
        log.error("several nodes need --rdzv-endpoint (LORA_RDZV_ENDPOINT): node 0's host:%d", RENDEZVOUS_PORT)
        return report.failed_with(ExitCode.CONFIG_INVALID, "ConfigInvalid", "several nodes need a rendezvous endpoint")
    reports = Path(tempfile.mkdtemp(prefix="lora-workers-"))
    os.environ[WORKER_REPORTS_ENV] = str(reports)  # the workers inherit it
    # each round's workers get a store of their own: the agent's shared one keeps the previous round's
    # keys, and after a restart a worker could read a dead peer's address (pytorch/pytorch#135712)
    os.environ[SHARED_STORE_OPT_OUT] = "1"
    log.info("launching %d process(es) on this node, %d node(s)", s["nproc_per_node"], s["nnodes"])
    code = ExitCode.OK
    try:
        elastic_launch(launch_config(s), entrypoint=sys.executable)("-m", "lora_trainer.cli", *worker_argv(argv))
    except ChildFailedError as err:
        code = exit_code_of(err.get_first_failure()[1].exitcode)
    except SignalException as err:
        code = 128 + int(err.sigval)
    finally:
        os.environ.pop(WORKER_REPORTS_ENV, None)
    message = worker_report(reports)
    shutil.rmtree(reports, ignore_errors=True)
    if message is not None:
        code = message.get("exitCode", code)
    report.forward(message, code)
    return code


def end_launch_if_permanent(report: TerminationReport, env: Mapping[str, str] = os.environ) -> None:
    """In a worker whose error is permanent, once its report is written: SIGTERM to the launcher, whose agent
    then stops the other workers and returns (restarting the group would only meet the error again). The
    signal comes before this worker exits, so the agent never sees a failure it could restart from."""
    if report.permanent and env.get(WORKER_REPORTS_ENV) and "RANK" in env:
        log.info("a permanent error: ending the launch without restarts")
        os.kill(os.getppid(), signal.SIGTERM)


def exit_code_of(exitcode: int) -> int:
    """A worker's exit code as a shell reports it: a signal (negative in Python) is 128 + its number."""
    return 128 - exitcode if exitcode < 0 else exitcode


def worker_report(folder: Path) -> dict | None:
    """The message the container passes on: the first permanent failure's (the others were stopped because of
    it), else the main process's if it ran here, else the first failure's, else the first worker's."""
    messages = []
    for path in sorted(folder.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        try:
            messages.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    main = [m for m in messages if m.get("rank", 0) == 0]
    failed = [m for m in messages if m.get("exitCode")]
    permanent = [m for m in failed if m.get("permanent")]
    return (permanent or main or failed or messages or [None])[0]
