"""Helpers for training tiny models in-process (CPU, seconds per run)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from lora_trainer.config import build_config
from lora_trainer.observers import BaseObserver
from lora_trainer.recipe import TrainingRecipe, default_observers

SAMPLE = Path(__file__).resolve().parents[2] / "trainer_image" / "lora_trainer" / "sample_data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: a hub id must fail fast, not retry

SD_BASE = {
    "base_model": "preset:tiny-sd",
    "train_data_dir": str(SAMPLE / "images"),
    "resolution": 16,
    "lora_rank": 4,
    "batch_size": 2,
    "max_train_steps": 4,
    "learning_rate": 1e-3,
    "save_steps": 2,
    "seed": 7,
}
LLM_BASE = {
    "task_type": "text-generation",
    "base_model": "preset:tiny-llm",
    "train_data_dir": str(SAMPLE / "text"),
    "max_seq_length": 64,
    "lora_rank": 4,
    "batch_size": 4,
    "max_train_steps": 4,
    "learning_rate": 1e-3,
    "save_steps": 2,
    "seed": 7,
}


class StopAt(BaseObserver):
    """Sets the recipe's stop flag after `step`, as the SIGTERM handler does."""

    def __init__(self, step: int, stop: threading.Event):
        self.step, self.stop = step, stop

    def on_step(self, stats) -> None:
        if stats.step == self.step:
            self.stop.set()


def make_config(base: dict, out: Path, **overrides):
    return build_config({**base, "output_dir": str(out), **overrides})


def run(base: dict, out: Path, observers=None, stop_at: int | None = None, **overrides) -> TrainingRecipe:
    cfg = make_config(base, out, **overrides)
    stop = threading.Event()
    observers = default_observers(cfg) + list(observers or [])
    if stop_at is not None:
        observers.append(StopAt(stop_at, stop))
    recipe = TrainingRecipe(cfg, observers=observers, stop=stop)
    recipe.run()
    return recipe


@pytest.fixture
def sd_base():
    return dict(SD_BASE)


@pytest.fixture
def llm_base():
    return dict(LLM_BASE)
