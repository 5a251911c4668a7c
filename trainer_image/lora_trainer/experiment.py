"""EXPERIMENT.md: the written record of a run, in its output folder, also when the run failed.

Which run made this file, why, on what data, with which settings and command, on what machine, how long
it took, how the loss went (with loss_curve.png beside it), what was written, and what went wrong. It is
an observer, so it sees exactly what TensorBoard sees, and it is written at the end of every run (on_end
is called even when setup failed before on_start). Writing it never raises: a broken record must not
hide the error that ended the run.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import atomic_write
from .layout import EXPERIMENT_RECORD, LOSS_CURVE, SAMPLES
from .observers import BaseObserver, RunInfo, StepStats, format_duration
from .redaction import redact
from .summary import RunSummary

log = logging.getLogger("lora_trainer")

SPIKE_WINDOW, SPIKE_MIN_HISTORY, SPIKE_FACTOR = 50, 10, 4.0
STALL_MIN_HISTORY, STALL_FACTOR = 10, 10.0
MAX_LISTED = 10

# the settings a reader compares between experiments first; the full config follows in a <details> block
KEY_PARAMETERS = (
    "base_model",
    "task_type",
    "lora_rank",
    "network_alpha",
    "target_modules",
    "train_text_encoder",
    "learning_rate",
    "text_encoder_lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "epochs",
    "max_train_steps",
    "resolution",
    "max_seq_length",
    "mixed_precision",
    "gradient_checkpointing",
    "max_grad_norm",
    "snr_gamma",
    "noise_offset",
    "seed",
)


@dataclass
class RunProblems:
    """Loss spikes and stalled steps, found as the run goes (the loss list alone cannot show stalls)."""

    spikes: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, median before)
    stalls: list[tuple[int, float, float]] = field(default_factory=list)  # (step, seconds, median seconds)
    losses: collections.deque = field(default_factory=lambda: collections.deque(maxlen=SPIKE_WINDOW))
    seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=SPIKE_WINDOW))

    def see(self, step: int, loss: float, seconds: float) -> None:
        if len(self.losses) >= SPIKE_MIN_HISTORY:
            median = statistics.median(self.losses)
            if loss > SPIKE_FACTOR * median:
                self.spikes.append((step, loss, median))
        if len(self.seconds) >= STALL_MIN_HISTORY:
            median = statistics.median(self.seconds)
            if seconds > STALL_FACTOR * median:
                self.stalls.append((step, seconds, median))
        self.losses.append(loss)
        self.seconds.append(seconds)


def loss_not_falling(losses: list[tuple[int, float]]) -> str | None:
    """A note when the last quarter of the losses is no lower than the first (at least 20 steps)."""
    if len(losses) < 20:
        return None
    quarter = len(losses) // 4
    first = statistics.fmean(v for _, v in losses[:quarter])
    last = statistics.fmean(v for _, v in losses[-quarter:])
    if last >= first:
        return (
            f"the loss did not fall: mean {last:.4g} over the last {quarter} steps vs {first:.4g} over "
            f"the first {quarter} (learning rate too low or too high, or data that cannot be learned?)"
        )
    return None


class ExperimentRecord(BaseObserver):
    """Writes <output_dir>/EXPERIMENT.md and loss_curve.png when the run ends, however it ends."""

    def __init__(self, cfg, command: list[str] | None = None, env: dict[str, str] | None = None, shown=None):
        """`cfg` is the config the recipe runs; `shown`, if given, the one to record: for an S3 run the user's,
        with its s3:// URIs, where `cfg` has the local copies' paths."""
        self.shown = shown or cfg
        self.out = Path(cfg.output_dir)
        self.command = list(sys.argv if command is None else command)
        self.env = dict(os.environ if env is None else env)
        self.info: RunInfo | None = None
        self.problems = RunProblems()
        self.learning_rates: list[tuple[int, float]] = []
        self.validation: list[tuple[int, float]] = []

    def on_start(self, info: RunInfo) -> None:
        self.info = info

    def on_step(self, stats: StepStats) -> None:
        self.problems.see(stats.step, stats.loss, stats.step_seconds)
        self.learning_rates.append((stats.step, stats.learning_rate))

    def on_validation(self, result: Any) -> None:
        if getattr(result, "loss", None) is not None:
            self.validation.append((result.step, result.loss))

    def on_end(self, summary: RunSummary) -> None:
        try:
            if not summary.output_prepared:  # refused before that, e.g. output_dir holds a finished run
                log.info("EXPERIMENT.md not written: %s was not prepared by this run", self.out)
                return
            curve = write_loss_curve(self.out / LOSS_CURVE, summary.losses, self.validation, summary.checkpoints)
            text = redact(render(self, summary, curve is not None))  # the command line, errors, paths
            atomic_write(self.out / EXPERIMENT_RECORD, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        except Exception as err:  # noqa: BLE001 - the record must never mask how the run ended
            log.warning("EXPERIMENT.md could not be written: %s: %s", type(err).__name__, err)


# -- the loss curve
def ema(values: list[float], smoothing: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = smoothing * average + (1 - smoothing) * value
        out.append(average / (1 - smoothing**i))
    return out


def write_loss_curve(
    path: Path, losses: list[tuple[int, float]], validation: list[tuple[int, float]], checkpoints: list[int]
) -> Path | None:
    """A PNG of the training loss (raw and smoothed), validation losses and checkpoint steps; None if no step ran."""
    if not losses:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, values = [s for s, _ in losses], [v for _, v in losses]
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1, label="loss/train")
    axes.plot(steps, ema(values), color="tab:blue", linewidth=2, label="loss/train (smoothed)")
    if validation:
        axes.plot(*zip(*validation), "o-", color="tab:orange", label="validation loss")
    for i, step in enumerate(checkpoints):
        axes.axvline(step, color="grey", linestyle=":", linewidth=1, label="checkpoint" if i == 0 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    return path


# -- the markdown
def experiment_id(cfg, started: float, config_yaml: str) -> str:
    """<output_name>-<UTC start>-<config hash>: unique per run, and the same config shows the same hash."""
    stamp = datetime.datetime.fromtimestamp(started, datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.output_name}-{stamp}-{hashlib.sha256(config_yaml.encode()).hexdigest()[:8]}"


def iso(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def cell(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    return lines + [f"| {cell(k)} | {cell(v)} |" for k, v in rows]


def status_line(summary: RunSummary) -> str:
    if summary.error:
        return f"Failed ({summary.error_reason})"
    if not summary.artifacts:
        return f"Interrupted at step {summary.step} (resume: latest continues from its last checkpoint)"
    return "Succeeded"


def launch_command(command: list[str]) -> str:
    if not command:
        return "(unknown)"
    return shlex.join([Path(command[0]).name, *command[1:]])


def hardware_rows(info: RunInfo | None) -> list[tuple[str, str]]:
    from importlib import metadata

    import torch

    rows = [("Device", info.device if info else "(the run stopped before choosing one)")]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows += [
            ("GPU", f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.1f} GiB"),
            ("Peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"),
        ]
    rows += [
        ("CPU", f"{platform.machine()}, {os.cpu_count()} cores"),
        ("OS", platform.platform()),
        ("Python", platform.python_version()),
    ]
    versions = []
    for package in ("torch", "diffusers", "transformers", "peft", "lora-operator"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    rows.append(("Software", ", ".join(versions)))
    return rows


def parameter_rows(cfg) -> list[tuple[str, Any]]:
    """The key parameters that apply to the run's task (config/schema.py says which keys are task-specific)."""
    from .config import config_fields

    tasks = {f.name: f.metadata["tasks"] for f in config_fields()}
    rows = [(key, getattr(cfg, key)) for key in KEY_PARAMETERS if not tasks[key] or cfg.task_type in tasks[key]]
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    rows.insert(
        rows.index(("gradient_accumulation_steps", cfg.gradient_accumulation_steps)) + 1,
        ("effective batch size", effective),
    )
    return [(k, "(unset)" if v is None else v) for k, v in rows]


def problem_lines(record: ExperimentRecord, summary: RunSummary) -> list[str]:
    lines = [f"- **{summary.error_reason}**: {summary.error}"] if summary.error else []
    lines += [f"- Data: {w}" for w in summary.warnings]
    spikes, stalls = record.problems.spikes, record.problems.stalls
    for step, loss, median in spikes[:MAX_LISTED]:
        lines.append(f"- Loss spike at step {step}: {loss:.4g} (median of the steps before: {median:.4g})")
    if len(spikes) > MAX_LISTED:
        lines.append(f"- ... and {len(spikes) - MAX_LISTED} more loss spikes")
    for step, seconds, median in stalls[:MAX_LISTED]:
        lines.append(f"- Stall at step {step}: {seconds:.2f} s (median step: {median:.2f} s)")
    if len(stalls) > MAX_LISTED:
        lines.append(f"- ... and {len(stalls) - MAX_LISTED} more stalled steps")
    flat = loss_not_falling(summary.losses)
    if flat:
        lines.append(f"- {flat}")
    return lines or ["None seen."]


def output_lines(summary: RunSummary, out: Path) -> list[str]:
    def rel(path: str) -> str:
        try:
            return str(Path(path).relative_to(out))
        except ValueError:
            return path

    lines = ["| File | Format | Step | sha256 |", "| --- | --- | --- | --- |"]
    lines += [f"| `{rel(a.path)}` | {a.format} | {a.step} | `{a.sha256[:16]}` |" for a in summary.artifacts]
    if not summary.artifacts:
        lines = ["No final weights were written."]
    steps = ", ".join(str(s) for s in summary.checkpoints) or "none"
    lines += ["", f"Checkpoints written at steps: {steps} (under `checkpoints/`)."]
    samples = sorted((out / SAMPLES).glob("*.png")) if (out / SAMPLES).is_dir() else []
    if samples:
        lines += [
            "",
            f"Validation samples: {len(samples)} image(s) under `samples/`, e.g. "
            f"![{samples[-1].name}](samples/{samples[-1].name})",
        ]
    return lines


def render(record: ExperimentRecord, summary: RunSummary, has_curve: bool) -> str:
    """The whole EXPERIMENT.md: a summary table first, then one section per question a reader has."""
    from .config import config_to_yaml

    cfg = record.shown
    config_yaml = config_to_yaml(cfg)
    ended = summary.ended or time.time()
    best = min(summary.losses, key=lambda item: item[1]) if summary.losses else None
    training_seconds = sum(summary.timings.get(k, 0.0) for k in ("data", "forward_backward", "optimizer"))
    steps = f"{summary.step} / {summary.total_steps or '?'}"
    if summary.resumed_from:
        steps += f" (resumed from step {summary.resumed_from})"
    overview = [
        ("Status", status_line(summary)),
        ("Purpose", cfg.description or "(not given: set `description` in the config)"),
        ("Task", f"{cfg.task_type} on `{cfg.base_model}`"),
        ("Started", iso(summary.started)),
        ("Ended", iso(ended)),
        ("Duration", format_duration(ended - summary.started)),
        ("Steps", steps),
        ("Final loss", number(summary.loss)),
        ("Best loss", f"{number(best[1])} (step {best[0]})" if best else "n/a"),
    ]
    if record.validation:
        overview.append(("Final validation loss", number(record.validation[-1][1])))
    lines = [f"# Experiment {experiment_id(cfg, summary.started, config_yaml)}", "", *table(overview, ("run", "")), ""]
    lines += ["## Purpose", "", cfg.description or "_No description was given._", ""]
    lines += ["## Dataset", "", f"`{cfg.train_data_dir}`", ""]
    if summary.data_summary:
        lines += table(list(summary.data_summary.items()), ("property", "value")) + [""]
    else:
        lines += ["The dataset was not summarized: the run ended before its data was read.", ""]
    lines += [
        "## Parameters",
        "",
        *table(parameter_rows(cfg), ("key", "value")),
        "",
        "<details><summary>Full resolved config (config_backup.yaml)</summary>",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    lines += ["## Command", "", "```console", launch_command(record.command), "```", ""]
    job = record.env.get("LORA_JOB_NAME")
    if job:
        lines += [f"LoRATrainingJob `{record.env.get('LORA_JOB_NAMESPACE', 'default')}/{job}`.", ""]
    lines += ["## Hardware", "", *table(hardware_rows(record.info), ("part", "value")), ""]
    lines += ["## Training", ""]
    rows = [
        ("Final loss", number(summary.loss)),
        ("Best loss", number(best[1]) if best else "n/a"),
        ("Final learning rate", number(record.learning_rates[-1][1]) if record.learning_rates else "n/a"),
        ("Samples seen", summary.samples),
    ]
    if summary.tokens:
        rows.append(("Tokens trained", summary.tokens))
    if training_seconds > 0 and summary.samples:
        rows.append(("Throughput", f"{summary.samples / training_seconds:.2f} samples/s"))
    rows += [
        (f"Time in {phase.replace('_', ' ')}", format_duration(seconds))
        for phase, seconds in sorted(summary.timings.items())
    ]
    lines += table(rows, ("metric", "value")) + [""]
    if has_curve:
        lines += [f"![Training loss]({LOSS_CURVE})", ""]
    lines += ["## Outputs", "", *output_lines(summary, record.out), ""]
    lines += ["## Problems", "", *problem_lines(record, summary), ""]
    return "\n".join(lines)
