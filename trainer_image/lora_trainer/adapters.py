"""LoRA on torch modules, shared by tasks and model families: target checks, parameter groups, autocast."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .errors import ConfigError, ModelError


def lora_param_groups(modules_and_lrs: list[tuple[torch.nn.Module, float]]) -> list[dict[str, Any]]:
    groups = []
    for module, lr in modules_and_lrs:
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr})
    if not groups:
        raise ModelError("no LoRA parameter is trainable: check target_modules against the model's module names")
    return groups


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_targets_exist(model: torch.nn.Module, targets: list[str], where: str, rank: int | None = None) -> None:
    """Every target names a module of the model; and a LoRA rank above every targeted layer's smaller side
    (a rank the update cannot have, whose weights could not even be allocated) is a config error."""
    modules = dict(model.named_modules())
    names = list(modules)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ModelError(f"target_modules {missing} match no module of the {where}; e.g. {_examples(names)}")
    sides = [_smaller_side(m) for n, m in modules.items() if any(n == t or n.endswith("." + t) for t in targets)]
    largest = max((s for s in sides if s), default=None)
    if rank is not None and largest is not None and rank > largest:
        raise ConfigError(
            f"lora_rank {rank} is above what any targeted layer of the {where} can use (at most {largest}: "
            "a LoRA update's rank is at most its layer's smaller side); choose a rank up to that"
        )


def _smaller_side(module: torch.nn.Module) -> int | None:
    """min(in, out) of a Linear or convolution (what bounds a LoRA update's rank), None for other modules."""
    for inputs, outputs in (("in_features", "out_features"), ("in_channels", "out_channels")):
        if isinstance(getattr(module, inputs, None), int) and isinstance(getattr(module, outputs, None), int):
            return min(getattr(module, inputs), getattr(module, outputs))
    return None


def _examples(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and "." in n})
    return ", ".join(leaves[:12])
