"""Tasks: what differs between text-to-image and text-generation LoRA training, one module each.

`task_class` is the one place that maps a config's task_type to its implementation (imported lazily:
text generation never imports diffusers).
"""

from __future__ import annotations

import importlib

from ..config import TrainConfig
from .base import Task

TASK_CLASSES = {
    "text-to-image": "lora_trainer.tasks.text_to_image:TextToImageTask",
    "text-generation": "lora_trainer.tasks.text_generation:TextGenerationTask",
}


def task_class(task_type: str) -> type:
    module, name = TASK_CLASSES[task_type].split(":")  # task_type is validated against config.schema.TASKS
    return getattr(importlib.import_module(module), name)


def build_task(cfg: TrainConfig) -> Task:
    return task_class(cfg.task_type)(cfg)
