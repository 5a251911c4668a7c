"""Errors a run can end with, each with its own exit code.

Exit codes are a contract with the operator (docs/architecture.md, "Exit codes"): codes of *permanent*
errors make the Job fail at once (retrying cannot help), every other non-zero code is retried from the last
checkpoint.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    CRASH = 1  # an unexpected exception: retried
    CONFIG_INVALID = 2  # bad config or manifest: permanent
    DATASET_INVALID = 3  # missing/unreadable/empty data: permanent
    MODEL_INVALID = 4  # base model missing or not loadable: permanent
    TRAINING_DIVERGED = 5  # NaN/inf loss: permanent (a resume would diverge again)
    STORAGE_INVALID = 6  # bad credentials, missing bucket, finished output exists: permanent
    OUTPUT_FAILED = 7  # disk full or an output write failed: retried (a new pod has a new disk)
    STORAGE_UNAVAILABLE = 8  # S3 unreachable after all retries: retried
    INTERRUPTED = 143  # SIGTERM: checkpoint written, then exited (128 + 15)

    @property
    def permanent(self) -> bool:
        return self in PERMANENT_EXIT_CODES


PERMANENT_EXIT_CODES = frozenset(
    {
        ExitCode.CONFIG_INVALID,
        ExitCode.DATASET_INVALID,
        ExitCode.MODEL_INVALID,
        ExitCode.TRAINING_DIVERGED,
        ExitCode.STORAGE_INVALID,
    }
)


class TrainError(Exception):
    """Base of the errors a person can act on; the message says what is wrong and where."""

    exit_code = ExitCode.CRASH
    reason = "Crashed"

    @property
    def permanent(self) -> bool:
        return self.exit_code.permanent


class ConfigError(TrainError):
    exit_code = ExitCode.CONFIG_INVALID
    reason = "ConfigInvalid"


class DatasetError(TrainError):
    exit_code = ExitCode.DATASET_INVALID
    reason = "DatasetInvalid"


class ModelError(TrainError):
    exit_code = ExitCode.MODEL_INVALID
    reason = "ModelInvalid"


class DivergedError(TrainError):
    exit_code = ExitCode.TRAINING_DIVERGED
    reason = "TrainingDiverged"


class StorageError(TrainError):
    exit_code = ExitCode.STORAGE_INVALID
    reason = "StorageInvalid"


class StorageUnavailableError(TrainError):
    exit_code = ExitCode.STORAGE_UNAVAILABLE
    reason = "StorageUnavailable"


class OutputError(TrainError):
    exit_code = ExitCode.OUTPUT_FAILED
    reason = "OutputFailed"


class Interrupted(TrainError):
    """Raised inside the loop after SIGTERM, once the checkpoint is safely written."""

    exit_code = ExitCode.INTERRUPTED
    reason = "Interrupted"
