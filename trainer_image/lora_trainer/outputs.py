"""The rules that keep earlier runs safe in an output folder (its layout: layout.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .checkpoint import list_checkpoints
from .config import TrainConfig, config_to_yaml
from .errors import ConfigError, StorageError
from .files import atomic_write
from .layout import (
    CHECKPOINTS,
    CONFIG_BACKUP,
    EXPERIMENT_RECORD,
    FINAL_WEIGHTS,
    LOSS_CURVE,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    SAMPLES,
    kohya_name,
)
from .ownership import MAX_MARKER_BYTES, OWNER_MARKER, claim_problem, owner_from_env


def run_files(cfg: TrainConfig) -> list[str]:
    """Everything a run writes at the top of output_dir (for overwrite)."""
    return [
        FINAL_WEIGHTS,
        CONFIG_BACKUP,
        EXPERIMENT_RECORD,
        PEFT_WEIGHTS,
        PEFT_CONFIG,
        kohya_name(cfg.output_name),
        LOSS_CURVE,
    ]


def is_finished(output_dir: Path) -> bool:
    return (output_dir / FINAL_WEIGHTS).is_file()


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Refuses to mix runs: a finished run, or checkpoints without `resume`, stop here unless overwrite."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a folder")
    ours = owner_from_env()
    problem = claim_problem(_read_marker(out / OWNER_MARKER), ours, cfg.overwrite, str(out))
    if problem:
        raise StorageError(problem)
    if cfg.overwrite:
        clear_run(cfg, out)
    elif is_finished(out):
        raise ConfigError(
            f"output_dir {out} holds a finished run ({FINAL_WEIGHTS}); choose another output_dir, "
            "or set overwrite: true to replace it"
        )
    elif cfg.resume is None and (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir()):
        steps = [c.step for c in list_checkpoints(out)]
        raise ConfigError(
            f"output_dir {out} holds checkpoints of an earlier run (steps {steps or 'incomplete'}); "
            "set resume: latest to continue it, or overwrite: true to start over"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CHECKPOINTS).mkdir(exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir {out} cannot be created: {err.strerror or err}") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"output_dir {out} is not writable")
    atomic_write(out / OWNER_MARKER, lambda tmp: tmp.write_bytes(ours.marker()))
    return out


def _read_marker(path: Path) -> bytes | None:
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_MARKER_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StorageError(f"{path} cannot be read: {err.strerror or err}") from None


def clear_run(cfg: TrainConfig, out: Path) -> None:
    """Removes what an earlier run wrote (and only that): user files in output_dir stay."""
    for name in run_files(cfg):
        (out / name).unlink(missing_ok=True)
    for folder in (out / CHECKPOINTS, Path(cfg.logging_dir), out / SAMPLES):
        shutil.rmtree(folder, ignore_errors=True)


def write_config_backup(cfg: TrainConfig, out: Path) -> Path:
    path = out / CONFIG_BACKUP
    atomic_write(path, lambda tmp: tmp.write_text(config_to_yaml(cfg)))
    return path
