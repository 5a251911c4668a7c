"""The observer that mirrors a local output folder to its s3:// prefix while the run goes on.

    on_start       the tree (config_backup.yaml first of all)
    on_checkpoint  the checkpoint's files, its manifest.json last, keep-last-N on S3, then the tree
    on_step        every `sync_seconds`: the tree (TensorBoard event files, EXPERIMENT.md, ...)
    on_end         the tree, and last of all the final weights file, the marker of a finished run;
                   after SIGTERM, only as long as the grace period allows; after a failure in setup,
                   the tree too (config_backup.yaml, EXPERIMENT.md say what went wrong)

config_backup.yaml holds the config as the user wrote it (s3:// URIs, not cache paths): the recipe writes
the config it is shown, not the local one it runs.

"The tree" is every file except step checkpoints (which go as whole checkpoints) and hidden files
(temporary files, the staging folder); a file is uploaded again only when its size or mtime changed.
All uploads run in the Uploader's thread; the training thread only hard-links a checkpoint's files
aside (so local pruning cannot pull them away mid-upload) and queues the job.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ..files import link_or_copy
from ..layout import (
    CHECKPOINTS,
    FINAL_WEIGHTS,
    MANIFEST,
    checkpoint_step,
    state_dir_name,
)
from ..observers import BaseObserver, RunInfo, StepStats
from ..summary import RunSummary
from .remote_checkpoints import prune_remote
from .store import Store
from .upload import Uploader
from .uri import S3Uri

log = logging.getLogger("lora_trainer")
STAGING = ".lora-upload"


def tree_files(root: Path) -> list[str]:
    """Relative paths of the files the tree sync owns: not step checkpoints, not hidden, not the final marker."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if (
            any(part.startswith(".") for part in rel.split("/"))
            or checkpoint_step(rel) is not None
            or rel == FINAL_WEIGHTS
        ):
            continue
        if path.is_file():
            found.append(rel)
    return sorted(found)


class S3Mirror(BaseObserver):
    def __init__(
        self,
        local: Path,
        remote: S3Uri,
        store: Store,
        uploader: Uploader,
        *,
        keep: int | None = None,
        sync_seconds: float = 60.0,
        grace_deadline: Callable[[], float | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.local, self.remote, self.store, self.uploader = Path(local), remote, store, uploader
        self.keep, self.sync_seconds = keep, sync_seconds
        self.grace_deadline, self.clock = grace_deadline, clock
        self.synced: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) last uploaded
        self.uploaded_checkpoints: list[int] = []
        self.on_uploaded: Callable[[int, str], None] = lambda step, uri: None  # (step, s3:// URI of its state)
        self.last_sync = clock()
        self.sync_queued = False
        self.problem: str | None = None  # why the mirror is incomplete, for the termination message

    # -- observer
    def on_start(self, info: RunInfo) -> None:
        self.sync_soon()

    def on_step(self, stats: StepStats) -> None:
        self.uploader.check()
        if self.clock() - self.last_sync >= self.sync_seconds:
            self.sync_soon()

    def on_checkpoint(self, step: int, paths: list[Any]) -> None:
        staged = self.stage(step, [Path(p) for p in paths])
        if not self.uploader.submit(partial(self.upload_checkpoint, step, staged)):
            shutil.rmtree(staged, ignore_errors=True)
            log.warning("checkpoint %d stays local: stopping while uploads to %s are behind", step, self.remote)
        self.sync_soon()

    def sync_soon(self) -> None:
        """Queues a tree sync unless one is already waiting; never blocks training for it."""
        if not self.sync_queued:
            self.sync_queued = self.uploader.submit(self.sync_tree, wait=False)

    def on_end(self, summary: RunSummary) -> None:
        if summary.error_reason in ("StorageInvalid", "StorageUnavailable"):
            return  # storage itself failed: more uploads would fail the same way
        finished = summary.error_reason is None and (self.local / FINAL_WEIGHTS).is_file()
        interrupted = summary.error_reason == "Interrupted"
        deadline = self.grace_deadline() if interrupted else None
        if self.uploader.failure is None:
            self.uploader.submit(partial(self.sync_tree, final=finished))
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        if not self.uploader.drain(timeout):
            self.problem = f"uploads to {self.remote} were still running when the SIGTERM grace period ended"
            log.warning(
                "%s; the newest checkpoint on S3 is step %s",
                self.problem,
                self.uploaded_checkpoints[-1] if self.uploaded_checkpoints else "none",
            )
            return
        if self.uploader.failure is not None:
            self.problem = f"uploads to {self.remote} failed: {self.uploader.failure}"
            if finished:
                self.uploader.check()  # a finished run whose outputs did not all reach S3 is not finished
            return
        if finished:
            log.info("outputs uploaded to %s", self.remote)

    def stage(self, step: int, paths: list[Path]) -> Path:
        """Hard-links the checkpoint's files under .lora-upload/step_<N>/ (same relative layout): cheap, and
        pruning by the recipe cannot pull them away before they are uploaded."""
        staged = self.local / STAGING / f"step_{step}"
        shutil.rmtree(staged, ignore_errors=True)
        for path in paths:
            for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                link_or_copy(file, staged / file.relative_to(self.local))
        return staged

    # -- jobs (run in the uploader thread)
    def upload_checkpoint(self, step: int, staged: Path) -> None:
        files = sorted(p for p in staged.rglob("*") if p.is_file())
        pairs = [(p, self.remote.child(p.relative_to(staged).as_posix())) for p in files]
        self.store.put_files([(p, uri) for p, uri in pairs if p.name != MANIFEST])
        self.store.put_files([(p, uri) for p, uri in pairs if p.name == MANIFEST])  # last: now it is complete
        shutil.rmtree(staged, ignore_errors=True)
        self.uploaded_checkpoints.append(step)
        self.on_uploaded(step, str(self.remote.child(f"{CHECKPOINTS}/{state_dir_name(step)}")))
        pruned = prune_remote(self.store, self.remote, self.keep)
        log.info(
            "checkpoint %d uploaded to %s%s",
            step,
            self.remote.child(CHECKPOINTS),
            f"; pruned {pruned}" if pruned else "",
        )

    def sync_tree(self, final: bool = False) -> None:
        self.sync_queued, self.last_sync = False, self.clock()
        changed = []
        for rel in tree_files(self.local):
            stat = (self.local / rel).stat()
            if self.synced.get(rel) != (stat.st_size, stat.st_mtime_ns):
                changed.append((rel, (stat.st_size, stat.st_mtime_ns)))
        if final:
            marker = self.local / FINAL_WEIGHTS
            stat = marker.stat()
            changed.append((FINAL_WEIGHTS, (stat.st_size, stat.st_mtime_ns)))  # last: the run is finished
        for batch in ([c for c in changed if c[0] != FINAL_WEIGHTS], [c for c in changed if c[0] == FINAL_WEIGHTS]):
            if batch:
                self.store.put_files([(self.local / rel, self.remote.child(rel)) for rel, _ in batch])
                self.synced.update(batch)

    # -- for the termination message
    def uri_for(self, path: str | Path) -> str | None:
        try:
            rel = Path(path).resolve().relative_to(self.local.resolve())
        except ValueError:
            return None
        return str(self.remote.child(rel.as_posix()))
