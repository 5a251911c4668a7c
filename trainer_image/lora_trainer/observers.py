"""What the training loop tells the world: progress lines or a bar, TensorBoard scalars.

The recipe calls observers at fixed points (start, each step, each checkpoint, end); each observer does
its own I/O, so the loop stays free of it. Metrics, S3 sync and the experiment record are observers too.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .files import atomic_write
from .layout import SAMPLES, sample_name
from .redaction import redact
from .summary import RunSummary

log = logging.getLogger("lora_trainer")


@dataclass
class StepStats:
    step: int
    total_steps: int
    epoch: int  # 1-based
    epochs: int
    loss: float
    learning_rate: float
    grad_norm: float
    samples: int
    tokens: int
    step_seconds: float
    eta_seconds: float | None = None

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.step_seconds if self.step_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_seconds if self.step_seconds > 0 else 0.0


@dataclass
class RunInfo:
    """Known once setup is done."""

    total_steps: int
    start_step: int
    epochs: int
    device: str
    trainable_parameters: int
    data_summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ValidationResult:
    """Sample images for fixed prompts (text-to-image) or a held-out loss (text-generation)."""

    step: int
    images: list[tuple[str, Any]] = field(default_factory=list)  # (prompt, PIL image)
    loss: float | None = None


class Observer(Protocol):
    """on_end is always called, with summary.error set on failure, even if setup failed before on_start."""

    def on_start(self, info: RunInfo) -> None: ...

    def on_step(self, stats: StepStats) -> None: ...

    def on_checkpoint(self, step: int, paths: list[Any]) -> None: ...

    def on_validation(self, result: ValidationResult) -> None: ...

    def on_labeling(self, done: int, total: int) -> None:
        """auto_label progress before training: `done` of `total` images captioned (0 first)."""

    def on_end(self, summary: RunSummary) -> None: ...


class BaseObserver:
    """No-op defaults, so an observer implements only what it needs."""

    def on_start(self, info: RunInfo) -> None:
        pass

    def on_step(self, stats: StepStats) -> None:
        pass

    def on_checkpoint(self, step: int, paths: list[Any]) -> None:
        pass

    def on_validation(self, result: ValidationResult) -> None:
        pass

    def on_labeling(self, done: int, total: int) -> None:
        pass

    def on_end(self, summary: RunSummary) -> None:
        pass


class EtaEstimator:
    """Seconds left, from the mean of the last `window` step times."""

    def __init__(self, window: int = 20):
        self.times: collections.deque[float] = collections.deque(maxlen=window)

    def update(self, step_seconds: float, steps_left: int) -> float:
        self.times.append(step_seconds)
        return steps_left * sum(self.times) / len(self.times)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def format_step_line(s: StepStats) -> str:
    rate = f"{s.tokens_per_second:.0f} tok/s" if s.tokens else f"{s.samples_per_second:.2f} samples/s"
    its = 1 / s.step_seconds if s.step_seconds > 0 else 0.0
    return (
        f"step {s.step}/{s.total_steps} epoch {s.epoch}/{s.epochs} loss={s.loss:.4f} lr={s.learning_rate:.2e} "
        f"grad_norm={s.grad_norm:.3f} {its:.2f} it/s {rate} eta {format_duration(s.eta_seconds)}"
    )


class ProgressReporter(BaseObserver):
    """A tqdm bar on a terminal; plain log lines every `every` steps otherwise (CI, pods, files)."""

    def __init__(self, every: int, stream=None):
        self.every, self.stream = every, stream or sys.stderr
        self.bar = None
        self.labeled = 0

    def on_labeling(self, done: int, total: int) -> None:
        """A line each tenth of auto_label's images (captioning 1000 images with BLIP takes a while on CPU)."""
        if done and done * 10 // total > self.labeled * 10 // total:
            log.info("auto_label: %d/%d images captioned", done, total)
        self.labeled = done

    def on_start(self, info: RunInfo) -> None:
        for warning in info.warnings:
            log.warning(warning)
        log.info("data: %s", ", ".join(f"{k}={v}" for k, v in info.data_summary.items()))
        log.info(
            "training %d steps (from step %d) on %s, %d trainable LoRA parameters",
            info.total_steps,
            info.start_step,
            info.device,
            info.trainable_parameters,
        )
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=info.total_steps, initial=info.start_step, unit="step", file=self.stream, dynamic_ncols=True
            )

    def on_step(self, stats: StepStats) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.learning_rate:.2e}", refresh=False)
            self.bar.update(1)
        elif stats.step % self.every == 0 or stats.step == stats.total_steps:
            log.info(format_step_line(stats))

    def on_checkpoint(self, step: int, paths: list[Any]) -> None:
        self._write(f"checkpoint at step {step}: {paths[0]}")

    def on_validation(self, result: ValidationResult) -> None:
        parts = []
        if result.loss is not None:
            parts.append(f"validation loss={result.loss:.4f}")
        if result.images:
            parts.append(f"{len(result.images)} sample image(s)")
        self._write(f"step {result.step}: " + ", ".join(parts))

    def _write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info(message)

    def on_end(self, summary: RunSummary) -> None:
        if self.bar is not None:
            self.bar.close()


class SampleWriter(BaseObserver):
    """Validation images as output_dir/samples/step_<N>_<i>.png, and their prompts in prompts.txt."""

    def __init__(self, output_dir: str):
        self.folder = Path(output_dir) / SAMPLES

    def on_validation(self, result: ValidationResult) -> None:
        for i, (_, image) in enumerate(result.images):
            atomic_write(
                self.folder / sample_name(result.step, i), lambda tmp, image=image: image.save(tmp, format="PNG")
            )
        if result.images:
            prompts = "".join(f"{i}: {redact(p)}\n" for i, (p, _) in enumerate(result.images))
            atomic_write(self.folder / "prompts.txt", lambda tmp: tmp.write_text(prompts))


class TensorBoardLogger(BaseObserver):
    """Scalars loss/train, learning_rate, grad_norm and throughput under logging_dir."""

    def __init__(self, logging_dir: str):
        self.logging_dir, self.writer = logging_dir, None

    def on_start(self, info: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops steps a resumed run redoes, so the curve has no doubled segment
        self.writer = SummaryWriter(self.logging_dir, purge_step=info.start_step + 1 if info.start_step else None)

    def on_step(self, s: StepStats) -> None:
        self.writer.add_scalar("loss/train", s.loss, s.step)
        self.writer.add_scalar("learning_rate", s.learning_rate, s.step)
        self.writer.add_scalar("grad_norm", s.grad_norm, s.step)
        self.writer.add_scalar("perf/samples_per_second", s.samples_per_second, s.step)
        if s.tokens:
            self.writer.add_scalar("perf/tokens_per_second", s.tokens_per_second, s.step)

    def on_validation(self, result: ValidationResult) -> None:
        import numpy as np

        if result.loss is not None:
            self.writer.add_scalar("loss/validation", result.loss, result.step)
        for i, (prompt, image) in enumerate(result.images):
            self.writer.add_image(f"validation/{i}", np.asarray(image), result.step, dataformats="HWC")
            self.writer.add_text(f"validation/{i}/prompt", redact(prompt), result.step)

    def on_end(self, summary: RunSummary) -> None:
        if self.writer is not None:
            self.writer.close()


class Stopwatch:
    """Accumulates wall time per phase: data, forward_backward, optimizer, checkpoint.

    `sync` (torch.cuda.synchronize when profiling on a GPU) makes asynchronous kernels count where they run.
    """

    def __init__(self, sync=None):
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.sync = sync or (lambda: None)

    @contextlib.contextmanager
    def measure(self, phase: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.totals[phase] += time.perf_counter() - start
