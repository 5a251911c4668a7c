"""Model families of the text-to-image task, one module each behind `ModelFamily` (families/base.py).

`FAMILIES` is the one place that knows them and the pipeline classes each trains; a family is detected from
the pipeline class that the model's model_index.json names, or chosen with the `model_family` key.
"""

from __future__ import annotations

import importlib

from ..config import TrainConfig
from ..errors import ModelError
from .base import ModelFamily, read_model_index

FAMILIES = {  # model_family -> ("module:Class" under lora_trainer.families, pipeline classes it trains)
    "sd": ("sd:StableDiffusion", ("StableDiffusionPipeline",)),
    "sdxl": ("sd:StableDiffusionXL", ("StableDiffusionXLPipeline",)),
    "flux1": ("flux1:Flux1", ("FluxPipeline",)),
    "flux2": ("flux2:Flux2", ("Flux2Pipeline", "Flux2KleinPipeline")),
    "sd3": ("sd3:StableDiffusion3", ("StableDiffusion3Pipeline",)),
    "qwen-image": ("qwen_image:QwenImage", ("QwenImagePipeline",)),
    "z-image": ("z_image:ZImage", ("ZImagePipeline",)),
}
BY_PIPELINE = {pipeline: name for name, (_, pipelines) in FAMILIES.items() for pipeline in pipelines}


def family_class(name: str) -> type[ModelFamily]:
    module, cls = FAMILIES[name][0].split(":")  # imported on first use: a family pulls in its own libraries
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def detect_family(cfg: TrainConfig) -> type[ModelFamily]:
    """The family of base_model's pipeline (model_index.json), checked against model_family when it is set."""
    pipeline = read_model_index(cfg).get("_class_name", "")
    detected = BY_PIPELINE.get(pipeline)
    chosen = cfg.model_family if cfg.model_family not in (None, "auto") else None
    if chosen and detected and chosen != detected:
        raise ModelError(f"base_model {cfg.base_model} is a {pipeline} ({detected}), but model_family is {chosen}")
    if not (chosen or detected):
        raise ModelError(
            f"base_model {cfg.base_model} is a {pipeline or 'pipeline of unknown class'}; text-to-image "
            f"trains {', '.join(sorted(BY_PIPELINE))} (model_family: {', '.join(FAMILIES)})"
        )
    return family_class(chosen or detected)
