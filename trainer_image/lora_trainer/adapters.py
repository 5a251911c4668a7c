"""LoRA on torch modules, shared by tasks and model families: target checks, parameter groups, autocast."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .errors import ModelError


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


def check_targets_exist(model: torch.nn.Module, targets: list[str], where: str) -> None:
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ModelError(f"target_modules {missing} match no module of the {where}; e.g. {_examples(names)}")


def _examples(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and "." in n})
    return ", ".join(leaves[:12])
