"""The console log of the commands (lora-train, lora-label, lora-merge): one format, quiet libraries."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s lora-train %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("lora_trainer")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    quiet_libraries()


def quiet_libraries() -> None:
    """Library progress bars (weight loading) and advice meant for notebooks would drown the run's log."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("transformers", "diffusers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
