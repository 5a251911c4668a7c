"""AdamW and the learning-rate schedules of the diffusers/transformers trainers."""

from __future__ import annotations

from typing import Any

import torch

from .config import TrainConfig


def build_optimizer(
    param_groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        fused=device.type == "cuda",  # one kernel for all LoRA tensors on GPU
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=total_steps,
        num_cycles=cfg.lr_num_cycles,
    )
