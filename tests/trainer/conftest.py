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


def tiny_sd_pipeline(path=None):
    """The tiny SD preset's pipeline, or another diffusers folder of that shape (e.g. a merged model)."""
    from diffusers import StableDiffusionPipeline

    from lora_trainer.presets import preset_path

    pipe = StableDiffusionPipeline.from_pretrained(path or preset_path("preset:tiny-sd"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe):
    """Two denoising steps at 32 px with a fixed seed: a cheap, exactly repeatable image tensor."""
    import torch

    return pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def final_weights(folder: Path):
    from safetensors.torch import load_file

    return load_file(folder / "pytorch_lora_weights.safetensors")


def assert_same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), f"{key} differs"


def assert_resumes_exactly(base: dict, tmp_path: Path, stop_at: int = 3, **settings) -> TrainingRecipe:
    """Trains straight through, then stopped by SIGTERM during step `stop_at` and resumed from its
    checkpoint: both must give the same losses and bit-identical final weights."""
    from lora_trainer.errors import Interrupted

    straight = run(base, tmp_path / "straight", **settings)
    with pytest.raises(Interrupted):
        run(base, tmp_path / "resumed", stop_at=stop_at, **settings)
    assert (tmp_path / f"resumed/checkpoints/state_step_{stop_at}/manifest.json").is_file()
    assert not (tmp_path / "resumed/pytorch_lora_weights.safetensors").exists()
    resumed = run(base, tmp_path / "resumed", resume="latest", **settings)
    assert resumed.summary.resumed_from == stop_at
    assert resumed.summary.losses == straight.summary.losses
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight"))
    return resumed


@pytest.fixture
def sd_base():
    return dict(SD_BASE)


@pytest.fixture
def llm_base():
    return dict(LLM_BASE)
