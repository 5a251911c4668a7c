"""The trainer's Prometheus metrics (names: docs/architecture.md, "Metrics"), served over HTTP and optionally pushed.

One registry per run (never the global one), labelled `job_name` and `namespace`. Prometheus and the
operator scrape `http://<bind>:<port>/metrics`; short runs may end between two scrapes, so with a
Pushgateway the metrics are also pushed every `every` steps (in a background thread, training never
waits on it) and once more at exit. A metrics failure is logged, never fatal to the run.

`lora_train_checkpoint_seconds` is the time from the end of a step to the checkpoint notice: saving,
pruning, and handing the checkpoint to the uploader; everything that held training back.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    push_to_gateway,
)

from .layout import state_dir_name
from .observers import BaseObserver, RunInfo, StepStats

log = logging.getLogger("lora_trainer")
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PUSH_JOB = "lora-train"


def gpu_memory_bytes() -> int:
    """Bytes PyTorch holds on the GPU (reserved: what nvidia-smi shows for the process); 0 without CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.memory_reserved())


class TrainerMetrics(BaseObserver):
    def __init__(
        self,
        job_name: str,
        namespace: str,
        pushgateway_url: str | None = None,
        every: int = 10,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.labels = {"job_name": job_name, "namespace": namespace}
        self.pushgateway_url, self.every, self.clock = pushgateway_url, every, clock
        self.registry = CollectorRegistry()
        names = list(self.labels)

        def make(kind, name: str, doc: str, **kwargs: Any):
            return kind(name, doc, names, registry=self.registry, **kwargs).labels(**self.labels)

        self.step = make(Gauge, "lora_train_step", "Optimizer steps done.")
        self.total_steps = make(Gauge, "lora_train_total_steps", "Optimizer steps of the whole run.")
        self.loss = make(Gauge, "lora_train_loss", "Training loss of the last step.")
        self.learning_rate = make(Gauge, "lora_train_learning_rate", "Learning rate of the last step.")
        self.samples = make(Counter, "lora_train_samples", "Training samples seen by this process.")
        self.tokens = make(Counter, "lora_train_tokens", "Training tokens seen by this process (text generation).")
        self.step_seconds = make(
            Histogram, "lora_train_step_seconds", "Wall time of one optimizer step.", buckets=STEP_BUCKETS
        )
        self.checkpoint_seconds = make(
            Gauge,
            "lora_train_checkpoint_seconds",
            "Seconds the last checkpoint held training back (save, prune, hand-over).",
        )
        self.gpu_memory = make(Gauge, "lora_train_gpu_memory_bytes", "Bytes PyTorch holds on the GPU.")
        self.epoch = make(Gauge, "lora_train_epoch", "Epoch under way (1-based).")
        self.labeling = make(Gauge, "lora_train_labeling_images", "Images auto_label captions before training.")
        self.labeled = make(Gauge, "lora_train_labeled_images", "Of those, the images captioned so far.")
        self.eta = make(Gauge, "lora_train_eta_seconds", "Estimated seconds until the last step (NaN: unknown).")
        self.eta.set(math.nan)
        self.last_checkpoint = Gauge(
            "lora_train_last_checkpoint_step",
            "Step of the newest checkpoint a resume can use; uri: where it is.",
            [*names, "uri"],
            registry=self.registry,
        )
        self.checkpoints_are_local = True  # False when an S3 mirror reports uploaded ones (checkpoint_saved)
        self.server = None
        self.step_ended = clock()
        self._push_wake = threading.Event()
        self._push_thread: threading.Thread | None = None
        self._closing = False
        self._push_warned = False

    # -- serving and pushing
    def serve(self, port: int, addr: str) -> str | None:
        """Starts the /metrics HTTP server; returns its host:port, or None (with a warning) if it cannot bind."""
        from prometheus_client import start_http_server

        try:
            self.server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as err:
            log.warning(
                "metrics: cannot serve on %s:%d (%s); training goes on without the endpoint",
                addr,
                port,
                err.strerror or err,
            )
            return None
        host, bound = self.server.server_address[:2]
        log.info("metrics: http://%s:%d/metrics", host, bound)
        return f"{host}:{bound}"

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def push(self) -> bool:
        if not self.pushgateway_url:
            return False
        try:
            push_to_gateway(
                self.pushgateway_url, job=PUSH_JOB, registry=self.registry, grouping_key=self.labels, timeout=5
            )
            return True
        except Exception as err:  # noqa: BLE001 - a metrics sink must never end a training run
            level = logging.DEBUG if self._push_warned else logging.WARNING
            log.log(level, "metrics: push to the Pushgateway failed: %s", err)
            self._push_warned = True
            return False

    def _push_loop(self) -> None:
        while True:
            self._push_wake.wait()
            self._push_wake.clear()
            if self._closing:
                return
            self.push()

    def push_soon(self) -> None:
        if not self.pushgateway_url:
            return
        if self._push_thread is None:
            self._push_thread = threading.Thread(target=self._push_loop, name="metrics-push", daemon=True)
            self._push_thread.start()
        self._push_wake.set()

    def close(self) -> None:
        """The exit push (so even a run shorter than a scrape interval is recorded), then the server stops."""
        self._closing = True
        if self._push_thread is not None:
            self._push_wake.set()
            self._push_thread.join(timeout=5)
        self.gpu_memory.set(gpu_memory_bytes())
        self.push()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # -- observer
    def on_start(self, info: RunInfo) -> None:
        self.total_steps.set(info.total_steps)
        self.step.set(info.start_step)
        self.step_ended = self.clock()
        self.push_soon()

    def on_labeling(self, done: int, total: int) -> None:
        self.labeling.set(total)
        self.labeled.set(done)
        self.push_soon()

    def on_step(self, stats: StepStats) -> None:
        self.step.set(stats.step)
        self.total_steps.set(stats.total_steps)
        self.loss.set(stats.loss)
        self.learning_rate.set(stats.learning_rate)
        self.samples.inc(stats.samples)
        self.tokens.inc(stats.tokens)
        self.step_seconds.observe(stats.step_seconds)
        self.epoch.set(stats.epoch)
        self.eta.set(math.nan if stats.eta_seconds is None else stats.eta_seconds)
        self.gpu_memory.set(gpu_memory_bytes())
        if stats.step % self.every == 0:
            self.push_soon()
        self.step_ended = self.clock()

    def on_checkpoint(self, step: int, paths: list[Any]) -> None:
        self.checkpoint_seconds.set(self.clock() - self.step_ended)
        state = [str(p) for p in paths if Path(p).name == state_dir_name(step)]
        if self.checkpoints_are_local and state:
            self.checkpoint_saved(step, state[0])

    def checkpoint_saved(self, step: int, uri: str) -> None:
        """A checkpoint a resume can use: written (local outputs) or uploaded with its manifest (S3)."""
        self.last_checkpoint.clear()  # one series: the newest
        self.last_checkpoint.labels(**self.labels, uri=uri).set(step)
        self.push_soon()
