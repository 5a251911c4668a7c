"""Deterministic, resumable data order, in groups (aspect-ratio buckets) or as one group.

The batches of epoch e are drawn from (seed, e) alone: each group's members are shuffled and cut into
batches (so a batch never mixes groups), then the batch order is shuffled. Every item also carries its
own seed for random crops and flips. A run resumed at any optimizer step therefore sees exactly the
batches and augmentations an uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..distributed import World, shard_bounds


@dataclass(frozen=True)
class EpochPlan:
    """How a dataset, in groups of item indices, is cut into batches and optimizer steps."""

    groups: tuple[tuple[int, ...], ...]
    batch_size: int
    accumulation: int

    @classmethod
    def single(cls, num_items: int, batch_size: int, accumulation: int) -> EpochPlan:
        return cls((tuple(range(num_items)),), batch_size, accumulation)

    @property
    def num_items(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def batches_per_epoch(self) -> int:
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups)

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

    def batches(self, seed: int, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out: list[list[int]] = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            out += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if len(self.groups) == 1:
            return out
        return [out[i] for i in torch.randperm(len(out), generator=generator).tolist()]


def item_seed(seed: int, epoch: int, position: int) -> int:
    """A seed per (run seed, epoch, position) for an item's random crop and flip; the primes keep nearby
    triples from colliding, the modulus keeps it a valid int64 generator seed."""
    return (seed * 1_000_003 + epoch * 100_003 + position) % (2**63)


class EpochBatches(torch.utils.data.Sampler):
    """A batch sampler over one epoch, starting at batch `start_batch`; yields [(index, item_seed), ...]."""

    def __init__(self, plan: EpochPlan, seed: int, epoch: int, start_batch: int = 0):
        self.plan, self.seed, self.epoch, self.start_batch = plan, seed, epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.plan.batches(self.seed, self.epoch)
        position = sum(len(b) for b in batches[: self.start_batch])
        for batch in batches[self.start_batch :]:
            yield [(index, item_seed(self.seed, self.epoch, position + i)) for i, index in enumerate(batch)]
            position += len(batch)

    def __len__(self) -> int:
        return self.plan.batches_per_epoch - self.start_batch


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of one global micro-batch's random draws (noise, noise levels): every process draws the same
    numbers for it, and a resumed run draws what an uninterrupted one would."""
    return (seed * 1_000_003 + epoch * 100_003 + batch * 7_919 + 1) % (2**63)


def run_batches(
    plan: EpochPlan, seed: int, epochs: int, start_epoch: int = 0, start_batch: int = 0
) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """(epoch, batch number, keys) of every global batch of a run from (start_epoch, start_batch) on."""
    for epoch in range(start_epoch, epochs):
        first = start_batch if epoch == start_epoch else 0
        for offset, keys in enumerate(EpochBatches(plan, seed, epoch, first)):
            yield epoch, first + offset, keys


class RunBatches(torch.utils.data.Sampler):
    """All batches of a run from (start_epoch, start_batch) to the end of `epochs`, so one DataLoader (and
    its worker processes) serves the whole run. With `world`, this process's part of each global batch
    (distributed.shard_bounds); a process with no part of a short last batch gets nothing for it, or with
    `stand_in` (when every process must run every forward: distributed_strategy fsdp) the batch's last item,
    which the recipe trains at zero weight."""

    def __init__(
        self,
        plan: EpochPlan,
        seed: int,
        epochs: int,
        start_epoch: int = 0,
        start_batch: int = 0,
        world: World | None = None,
        per_process: int | None = None,
        stand_in: bool = False,
    ):
        self.plan, self.seed, self.epochs = plan, seed, epochs
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.world, self.per_process = world or World(), per_process or plan.batch_size
        self.stand_in = stand_in

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for _, _, keys in run_batches(self.plan, self.seed, self.epochs, self.start_epoch, self.start_batch):
            lo, hi = shard_bounds(len(keys), self.world, self.per_process)
            if lo < hi:
                yield keys[lo:hi]
            elif self.stand_in:
                yield keys[-1:]

    def __len__(self) -> int:
        return sum(1 for _ in self)


def group_by(keys: Sequence) -> tuple[tuple[int, ...], ...]:
    """Item indices grouped by equal key, groups in order of first appearance."""
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return tuple(tuple(g) for g in groups.values())
