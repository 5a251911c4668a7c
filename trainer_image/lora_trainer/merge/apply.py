"""Adding LoRA updates into a model's weights: W <- W + scale * (alpha / r) * up @ down, per module."""

from __future__ import annotations

import torch

from ..errors import ModelError
from ..formats.lora import LoraWeight


def find_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module at `path`; CLIP paths are tried with and without 'text_model.' (transformers >= 5.6
    flattened CLIPTextModel, while LoRA files from other tools keep the prefix)."""
    candidates = [path]
    if path.startswith("text_model."):
        candidates.append(path[len("text_model.") :])
    else:
        candidates.append("text_model." + path)
    for candidate in candidates:
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise ModelError(
        f"the LoRA adapts module {path}, which the base model does not have (a LoRA for another model architecture?)"
    )


def check_shape(path: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
    if weight.shape != delta.shape:
        raise ModelError(
            f"LoRA for {path} has shape {tuple(delta.shape)}, the base weight {tuple(weight.shape)} "
            "(a LoRA for another base model?)"
        )


@torch.no_grad()
def apply_loras(model: torch.nn.Module, loras: dict[str, LoraWeight], scale: float) -> int:
    """Adds every update of `loras` (module path -> weights) at `scale` into `model`, in float32;
    returns how many modules changed. Checks everything before changing anything."""
    targets = []
    for path, lora in loras.items():
        module = find_module(model, path)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ModelError(f"LoRA target {path} is a {type(module).__name__} without a weight")
        delta = lora.delta()
        check_shape(path, weight, delta)
        targets.append((weight, delta))
    for weight, delta in targets:
        weight.copy_((weight.float() + scale * delta.to(weight.device)).to(weight.dtype))
    return len(targets)
