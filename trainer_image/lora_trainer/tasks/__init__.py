"""Tasks: what differs between text-to-image and text-generation LoRA training."""

from __future__ import annotations

from ..config import TrainConfig
from .base import Task


def build_task(cfg: TrainConfig) -> Task:
    if cfg.task_type == "text-generation":
        from .text_generation import TextGenerationTask

        return TextGenerationTask(cfg)
    from .text_to_image import TextToImageTask

    return TextToImageTask(cfg)
