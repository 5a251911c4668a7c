"""The background Uploader: upload jobs run one after another in their own thread, fed by a bounded queue.

Training hands a checkpoint over and goes on; only when `queue_size` jobs already wait (S3 slower than checkpointing, or
down) does submit() block, which bounds the memory and disk that pending uploads hold. Once the run is stopping
(SIGTERM), a blocked submit() gives up, so the final checkpoint is still written within the grace period. A job that fails
after its retries is kept and raised in the training thread at the next check(), so a permanent storage
error (credentials revoked) stops the run instead of being lost.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("lora_trainer")


class Uploader:
    """A background thread running upload jobs (callables) from a bounded queue, in order."""

    def __init__(self, queue_size: int = 4, stopping: Callable[[], bool] = lambda: False):
        self.stopping = stopping
        self.queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=queue_size)
        self.failure: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.blocked_seconds = 0.0  # how long submit() held the training thread

    def start(self) -> Uploader:
        self.thread = threading.Thread(target=self._run, name="s3-uploader", daemon=True)
        self.thread.start()
        return self

    def submit(self, job: Callable[[], None], wait: bool = True) -> bool:
        """Queues a job; while the queue is full, waits for room (wait=True) unless the run is stopping.
        False when the job was not queued."""
        self.check()
        started = time.perf_counter()
        try:
            while True:
                try:
                    self.queue.put(job, timeout=0.2) if wait else self.queue.put_nowait(job)
                    return True
                except queue.Full:
                    if not wait or self.stopping():
                        return False
        finally:
            self.blocked_seconds += time.perf_counter() - started

    def check(self) -> None:
        """Raises the error a job ended with, in the calling (training) thread."""
        if self.failure is not None:
            raise self.failure

    def drain(self, timeout: float | None = None) -> bool:
        """Waits until every queued job ran; False if `timeout` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.queue.all_tasks_done:
            while self.queue.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.queue.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stops the thread after the queued jobs (waits at most `timeout` seconds for it)."""
        if self.thread is None:
            return
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=timeout)
        self.thread.join(timeout)
        self.thread = None

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            try:
                if job is None:
                    return
                if self.failure is None:  # after a failure the rest is skipped: it would fail the same way
                    job()
            except BaseException as err:  # noqa: BLE001 - handed to the training thread by check()
                log.error("upload failed: %s", err)
                self.failure = err
            finally:
                self.queue.task_done()
