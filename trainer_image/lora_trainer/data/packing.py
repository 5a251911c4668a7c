"""How tokenized samples become batches: one padded sample per row, or samples packed padding-free into rows.

Packing (`packing: true`) puts the samples into rows of up to max_seq_length tokens by best-fit decreasing
(TRL's `bfd` strategy): longest first, each sample into the fullest row that still has room. The rows are
the dataset's items, so the deterministic sampler shuffles rows and a resumed run sees the rows an
uninterrupted one would. In a row, positions restart at 0 with every sample and there is no attention
mask: transformers reads restarting position_ids as packed sequences and keeps attention inside each sample
(SDPA and eager attention get a block-diagonal causal mask, flash attention its variable-length kernel), as
transformers' DataCollatorWithFlattening and TRL's padding-free collator do. The first label of every sample
is masked, so a sample's last token never learns to predict the next sample's first: each sample keeps
exactly the loss terms it has alone, and the mean over a batch's trained tokens is the padded batch's.

Rows are padded only up to the longest row of their batch; the padding continues the last sample's
positions, after its tokens, where causal attention keeps it from changing them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from .text import IGNORE_INDEX, Example, TokenDataset, collate_tokens


def trained_tokens(example: Example) -> int:
    """Labels the causal LM predicts (shifted by one): what the example weighs in a batch's mean loss."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[tuple[int, ...]]:
    """Rows of sample indices, no row longer than `capacity` (every length must fit); deterministic."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted: the fullest row with room comes first
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(room, (lengths[index], -1))
        if at == len(room):
            rows.append([index])
            left, row = capacity - lengths[index], len(rows) - 1
        else:
            left, row = room.pop(at)
            rows[row].append(index)
            left -= lengths[index]
        if left > 0:
            bisect.insort(room, (left, row))
    return [tuple(r) for r in rows]


class Padded:
    """One sample per row, rows padded to the longest of the batch and masked (the default)."""

    def __init__(self, examples: list[Example], pad_id: int):
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def dataset(self) -> torch.utils.data.Dataset:
        return TokenDataset(self.examples)

    def collate(self, items: list[Example]) -> dict[str, torch.Tensor]:
        return collate_tokens(self.pad_id)(items)

    def item_weights(self) -> list[float]:
        return [float(trained_tokens(e)) for e in self.examples]

    @staticmethod
    def samples(batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    def summary(self) -> dict[str, Any]:
        return {}


class RowDataset(torch.utils.data.Dataset):
    """Items are rows: the samples packed into one row, fetched by (row, item_seed) keys."""

    def __init__(self, examples: list[Example], rows: list[tuple[int, ...]]):
        self.examples, self.rows = examples, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> list[Example]:
        return [self.examples[i] for i in self.rows[key[0]]]


@dataclass(frozen=True)
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pack_row(samples: list[Example]) -> PackedRow:
    ids, labels, positions = [], [], []
    for sample in samples:
        ids += sample.input_ids
        labels += [IGNORE_INDEX, *sample.labels[1:]]  # the previous sample's last token predicts nothing
        positions += range(len(sample.input_ids))
    return PackedRow(ids, labels, positions)


class Packed:
    """Samples packed into rows of up to `capacity` tokens (see the module docstring)."""

    def __init__(self, examples: list[Example], capacity: int, pad_id: int):
        self.examples, self.capacity, self.pad_id = examples, capacity, pad_id
        self.rows = best_fit_decreasing([len(e.input_ids) for e in examples], capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def dataset(self) -> torch.utils.data.Dataset:
        return RowDataset(self.examples, self.rows)

    def collate(self, items: list[list[Example]]) -> dict[str, torch.Tensor]:
        rows = [pack_row(samples) for samples in items]
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n, last = len(row.input_ids), row.position_ids[-1]
            ids[i, :n], labels[i, :n] = torch.tensor(row.input_ids), torch.tensor(row.labels)
            positions[i, :n] = torch.tensor(row.position_ids)
            positions[i, n:] = torch.arange(last + 1, last + 1 + width - n)  # padding continues the last sample
        return {"input_ids": ids, "labels": labels, "position_ids": positions}

    def item_weights(self) -> list[float]:
        return [float(sum(trained_tokens(self.examples[i]) for i in row)) for row in self.rows]

    @staticmethod
    def samples(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["position_ids"] == 0).sum())  # every sample starts at position 0; padding never does

    def summary(self) -> dict[str, Any]:
        tokens = sum(len(e.input_ids) for e in self.examples)
        return {"packed_rows": len(self.rows), "packed_fill": round(tokens / (len(self.rows) * self.capacity), 3)}
