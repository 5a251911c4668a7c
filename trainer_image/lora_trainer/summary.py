"""How a run went, as the recipe reports it to its observers: RunSummary and the Artifacts it wrote.

Torch-free: the termination message, EXPERIMENT.md, the S3 mirror and the metrics read it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Artifact:
    path: str
    format: str  # "diffusers", "peft", "kohya", "config"
    sha256: str
    step: int


@dataclass
class RunSummary:
    """How a run ended; the termination message, EXPERIMENT.md and the operator's status read it."""

    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    best_loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    resumed_from: int | None = None
    samples: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.time)
    ended: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    data_summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    error_reason: str | None = None  # a TrainError's reason ("Interrupted", "StorageInvalid", ...) or "Crashed"
    output_prepared: bool = False  # output_dir is this run's (a refused run must not touch an earlier one's record)
