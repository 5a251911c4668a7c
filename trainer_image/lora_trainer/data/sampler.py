"""Deterministic, resumable data order.

The order of epoch e is a permutation drawn from (seed, e) alone, and every item carries its own seed for
random crops and flips, so a run resumed at any optimizer step sees exactly the batches, and the
augmentations, that an uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class EpochPlan:
    """How a dataset of `num_items` is cut into batches and optimizer steps."""

    num_items: int
    batch_size: int
    accumulation: int

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_items / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        # a shorter last group ends each epoch, as in the diffusers examples
        return math.ceil(self.batches_per_epoch / self.accumulation)

    def total_steps(self, epochs: int, max_train_steps: int | None) -> int:
        return max_train_steps if max_train_steps is not None else epochs * self.steps_per_epoch

    def epochs_needed(self, total_steps: int) -> int:
        return math.ceil(total_steps / self.steps_per_epoch)

    def step_groups(self) -> list[int]:
        """Micro-batches in each optimizer step of an epoch."""
        full, rest = divmod(self.batches_per_epoch, self.accumulation)
        return [self.accumulation] * full + ([rest] if rest else [])


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def item_seed(seed: int, epoch: int, position: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + position) % (2**63)


class EpochBatches(torch.utils.data.Sampler):
    """A batch sampler over one epoch, starting at batch `start_batch`; yields [(index, item_seed), ...]."""

    def __init__(self, plan: EpochPlan, seed: int, epoch: int, start_batch: int = 0):
        self.plan, self.seed, self.epoch, self.start_batch = plan, seed, epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.plan.num_items, self.seed, self.epoch)
        bs = self.plan.batch_size
        for b in range(self.start_batch, self.plan.batches_per_epoch):
            positions = range(b * bs, min((b + 1) * bs, len(order)))
            yield [(order[p], item_seed(self.seed, self.epoch, p)) for p in positions]

    def __len__(self) -> int:
        return self.plan.batches_per_epoch - self.start_batch
