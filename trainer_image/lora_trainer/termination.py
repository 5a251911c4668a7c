"""The termination message: one line of JSON saying how the run ended, written on every exit.

Kubernetes copies the file (default /dev/termination-log) into the pod's status, keeping at most 4096
bytes; the operator reads it (docs/trainer-operator.md). `encode` shortens a message to fit while
keeping it valid JSON: the error text first, then the artifact list. Secrets known from the
environment are removed from every message.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ExitCode, TrainError
from .layout import CHECKPOINTS, state_dir_name
from .redaction import redact
from .summary import RunSummary

log = logging.getLogger("lora_trainer")
LIMIT = 4096
DEFAULT_PATH = "/dev/termination-log"
ENV_PATH = "LORA_TERMINATION_MESSAGE_PATH"
WORKER_REPORTS_ENV = "LORA_WORKER_REPORT_DIR"  # set by the launcher (elastic.py): its workers write there


def status_of(exit_code: int) -> str:
    if exit_code == ExitCode.OK:
        return "succeeded"
    return "interrupted" if exit_code == ExitCode.INTERRUPTED else "failed"


def build_message(
    exit_code: int,
    summary: RunSummary | None = None,
    error: str | None = None,
    reason: str | None = None,
    permanent: bool = False,
    uri_for: Callable[[str], str] = str,
    last_checkpoint: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """The message of docs/trainer-operator.md, from how the run ended (summary: a RunSummary or None)."""
    message: dict[str, Any] = {"status": status_of(exit_code), "exitCode": int(exit_code)}
    if summary is not None:
        message.update(
            step=summary.step or (summary.resumed_from or 0),
            totalSteps=summary.total_steps,
            loss=None if summary.loss is None else round(summary.loss, 6),
        )
        if exit_code == ExitCode.OK:
            message["artifacts"] = [
                {"uri": uri_for(a.path), "format": a.format, "sha256": a.sha256, "step": a.step}
                for a in summary.artifacts
            ]
    if last_checkpoint is not None:
        message["lastCheckpoint"] = {"step": last_checkpoint[0], "uri": last_checkpoint[1]}
    if exit_code != ExitCode.OK:
        if error:
            message["error"] = error
        message.update(reason=reason or "Crashed", permanent=permanent)
    return message


def encode(message: dict[str, Any], limit: int = LIMIT) -> str:
    """One line of JSON of at most `limit` UTF-8 bytes: a long error is cut first, then artifacts dropped."""

    def dumps(m: dict[str, Any]) -> str:
        return json.dumps(m, separators=(",", ":"), ensure_ascii=False)

    def fits(m: dict[str, Any]) -> bool:
        return len(dumps(m).encode()) <= limit

    message = dict(message)
    error = message.get("error")
    if error and not fits(message):
        lo, hi = 0, len(error)
        while lo < hi:  # the longest prefix of the error that fits (escaping makes bytes hard to predict)
            mid = (lo + hi + 1) // 2
            message["error"] = error[:mid] + " [...]"
            lo, hi = (mid, hi) if fits(message) else (lo, mid - 1)
        message["error"] = error[:lo] + " [...]"
    artifacts = list(message.get("artifacts", []))
    total = len(artifacts)
    while not fits(message) and artifacts:
        artifacts.pop()  # the main weights file comes first and goes last
        message.update(artifacts=artifacts, artifactsOmitted=total - len(artifacts))
    if not fits(message):  # pathological: keep what the operator acts on
        message = {k: message[k] for k in ("status", "exitCode", "reason", "permanent", "step") if k in message}
    return dumps(message)


class LocalOutputs:
    """Where a local run's artifacts and checkpoints are (the counterpart of StorageSession for s3://)."""

    def __init__(self, output_dir: str):
        self.local_output_dir = output_dir
        self.output_dir = Path(output_dir).resolve()
        self.problem: str | None = None

    def uri_for(self, path: str | Path) -> str:
        return str(Path(path).resolve())

    def last_checkpoint(self, summary: RunSummary) -> tuple[int, str] | None:
        steps = [*summary.checkpoints, *([summary.resumed_from] if summary.resumed_from else [])]
        if not steps:
            return None
        return max(steps), str(self.output_dir / CHECKPOINTS / state_dir_name(max(steps)))


@dataclass
class TerminationReport:
    """Collects how the run ended and writes the message once, at exit (cli.main's finally)."""

    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    path: str | None = None
    summary: RunSummary | None = None  # the recipe's RunSummary, once a recipe exists
    outputs: Any = None  # LocalOutputs or a StorageSession: URIs of artifacts and of the last checkpoint
    exit_code: int | None = None
    error: str | None = None
    reason: str | None = None
    permanent: bool = False
    forwarded: dict[str, Any] | None = None  # a worker's message the launcher passes on (elastic.py)

    def configure(self, cfg: Any) -> None:
        if cfg.termination_message_path != DEFAULT_PATH:
            self.path = cfg.termination_message_path

    def succeeded(self) -> int:
        self.exit_code = ExitCode.OK
        return self.exit_code

    def failed(self, err: BaseException) -> int:
        """Records an error (TrainError: its code and reason; anything else: a crash); returns the exit code."""
        if isinstance(err, TrainError):
            self.exit_code, self.reason, self.permanent = err.exit_code, err.reason, err.permanent
            text = str(err)
        else:
            self.exit_code, self.reason, self.permanent = ExitCode.CRASH, "Crashed", False
            text = f"{type(err).__name__}: {err}"
        if self.exit_code == ExitCode.INTERRUPTED:  # not an error, unless the checkpoint did not reach S3
            text = getattr(self.outputs, "problem", None) or ""
        self.error = redact(text, self.env) or None
        return self.exit_code

    def failed_with(self, exit_code: int, reason: str, error: str) -> int:
        self.exit_code, self.reason, self.error = exit_code, reason, redact(error, self.env)
        self.permanent = ExitCode(exit_code).permanent
        return exit_code

    def forward(self, message: dict[str, Any] | None, exit_code: int) -> None:
        """The launcher's report: a worker's message as it is (or, none written, the bare exit code)."""
        self.forwarded = message
        self.exit_code = exit_code
        if message is None and exit_code:
            self.reason, self.error = "Crashed", "a training process ended without a report"

    def message(self) -> dict[str, Any]:
        if self.forwarded is not None:
            return self.forwarded
        outputs = self.outputs
        last = outputs.last_checkpoint(self.summary) if outputs is not None and self.summary is not None else None
        uri_for = outputs.uri_for if outputs is not None else str
        message = build_message(self.exit_code, self.summary, self.error, self.reason, self.permanent, uri_for, last)
        world = int(self.env.get("WORLD_SIZE", 1))
        if world > 1:  # the operator takes artifacts and progress from the main process's message
            message.update(rank=int(self.env.get("RANK", 0)), worldSize=world)
        return message

    def target(self) -> Path | None:
        """The configured path, else $LORA_TERMINATION_MESSAGE_PATH, else the default file if it exists
        (Kubernetes creates it; outside a pod nothing is written into /dev)."""
        if self.env.get(WORKER_REPORTS_ENV):
            return Path(self.env[WORKER_REPORTS_ENV]) / f"rank-{self.env.get('RANK', '0')}.json"
        explicit = self.path or self.env.get(ENV_PATH)
        if explicit:
            return Path(explicit)
        return Path(DEFAULT_PATH) if os.path.exists(DEFAULT_PATH) else None

    def write(self) -> None:
        path = self.target()
        if self.exit_code is None or path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(encode(self.message()) + "\n", encoding="utf-8")
        except OSError as err:
            log.warning("cannot write the termination message to %s: %s", path, err.strerror or err)
