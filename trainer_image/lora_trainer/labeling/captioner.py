"""Image captioning models from transformers: BLIP by default, any image-to-text model by name.

One code path for all of them: AutoProcessor + AutoModelForImageTextToText, generate, decode. That covers
BLIP, GIT, vision-encoder-decoder captioners and VLMs that take an optional text prompt. The model loads
on first use, so a run with nothing to caption never loads it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..presets import is_preset, preset_path

log = logging.getLogger("lora_trainer")

DEFAULT_LABEL_MODEL = "Salesforce/blip-image-captioning-base"


def model_source(name: str) -> str:
    """A preset's local folder, an existing local path, or the hub id unchanged."""
    if is_preset(name):
        return str(preset_path(name))
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA GPU is visible")
    return torch.device(device)


class Captioner:
    """caption(images) -> one caption per PIL image, in order."""

    def __init__(
        self,
        model: str = DEFAULT_LABEL_MODEL,
        device: str = "auto",
        max_new_tokens: int = 40,
        num_beams: int = 1,
        prompt: str | None = None,
    ):
        self.model_name, self.device_name = model, device
        self.max_new_tokens, self.num_beams, self.prompt = max_new_tokens, num_beams, prompt
        self.model: Any = None
        self.processor: Any = None

    def load(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = model_source(self.model_name)
        self.device = pick_device(self.device_name)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).to(self.device).eval()
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"cannot load the captioning model {self.model_name}: {first}") from None
        log.info("captioning with %s on %s", self.model_name, self.device)

    def caption(self, images: list[Any]) -> list[str]:
        import torch

        if self.model is None:
            self.load()
        kwargs = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            ids = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
            )
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]  # one line each; a prompt BLIP echoes stays
