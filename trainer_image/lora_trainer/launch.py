"""One lora-train run in its world: cluster defaults, metrics, S3 inputs and outputs, then the recipe.

The recipe only knows local folders. Around it, in this order: the metrics endpoint starts (so a pod is
observable while it downloads), s3:// inputs are fetched and outputs prepared (storage/stage.py), the
recipe runs with the S3 mirrors and the metrics among its observers, and at exit the uploads finish,
the metrics are pushed and the server stops, whatever happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from .compat import FullyShard, check_libraries
from .config import TrainConfig
from .distributed import World
from .errors import Interrupted
from .metrics import TrainerMetrics
from .storage.uri import is_s3
from .termination import LocalOutputs, TerminationReport

log = logging.getLogger("lora_trainer")


class StopSignal(threading.Event):
    """The SIGTERM flag (set by cli.install_sigterm); remembers when, so uploads get the rest of the grace."""

    at: float | None = None

    def set(self) -> None:
        if self.at is None:
            self.at = time.monotonic()
        super().set()

    def grace_deadline(self, grace_seconds: float) -> float:
        return (self.at if self.at is not None else time.monotonic()) + grace_seconds


def with_cluster_defaults(cfg: TrainConfig, env: Mapping[str, str] = os.environ) -> TrainConfig:
    """`resume: latest` unless set, where a run may be restarted after preemption: an s3:// output_dir or a
    pod (LORA_JOB_NAME set). Starting over there would throw the earlier attempts' steps away."""
    if cfg.resume is None and (is_s3(cfg.output_dir) or env.get("LORA_JOB_NAME")):
        return dataclasses.replace(cfg, resume="latest")
    return cfg


def start_metrics(cfg: TrainConfig, env: Mapping[str, str] = os.environ) -> TrainerMetrics:
    metrics = TrainerMetrics(
        job_name=env.get("LORA_JOB_NAME") or cfg.output_name or "lora",
        namespace=env.get("LORA_JOB_NAMESPACE") or "local",
        pushgateway_url=cfg.pushgateway_url,
        every=cfg.logging_steps,
    )
    if cfg.metrics_port:
        metrics.serve(cfg.metrics_port, cfg.metrics_bind or env.get("POD_IP") or "127.0.0.1")
    return metrics


def launch(cfg: TrainConfig, stop: StopSignal, report: TerminationReport, env: Mapping[str, str] = os.environ) -> Any:
    """Runs the training described by `cfg` (s3:// paths allowed); returns the RunSummary. With several
    processes (distributed.py), the main one alone serves metrics, writes and uploads outputs and keeps the
    record; the first process of each node downloads the inputs before the others find them cached."""
    from .recipe import TrainingRecipe, default_observers, pick_device
    from .storage.stage import StorageSession
    from .tasks import task_class

    cfg = with_cluster_defaults(cfg, env)
    needs = task_class(cfg.task_type).library_needs(cfg)
    if cfg.distributed_strategy == "fsdp":
        needs.append(FullyShard())
    check_libraries(needs)  # before any download or model load
    world = World.from_env(env)
    world.start(pick_device(cfg, world)[0].type)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(world.stop)
        metrics = start_metrics(cfg, env) if world.is_main else None
        if metrics is not None:
            cleanup.callback(metrics.close)
        session = StorageSession(
            cfg,
            lambda: stop.grace_deadline(cfg.sigterm_grace_seconds),
            stopping=stop.is_set,
            outputs=world.is_main,
        )
        report.outputs = session if session.active else LocalOutputs(cfg.output_dir)
        cleanup.callback(session.close)
        with world.local_main_first():
            local = session.prepare()
        if metrics is not None and session.output_mirror is not None:  # a resume needs the checkpoint on S3
            metrics.checkpoints_are_local = False
            session.output_mirror.on_uploaded = metrics.checkpoint_saved
        if world.any(stop.is_set()):
            raise Interrupted("stopped by SIGTERM before training started; nothing to checkpoint")
        observers = [*default_observers(local, shown=cfg), *session.mirrors, metrics] if world.is_main else []
        recipe = TrainingRecipe(local, observers=observers, stop=stop, world=world, shown=cfg)
        report.summary = recipe.summary
        return recipe.run()
