"""Packing tokenized samples into rows: best-fit decreasing, and the padding-free rows' ids, labels, positions."""

from __future__ import annotations

import random

import pytest
import torch

from lora_trainer.data.packing import Packed, Padded, best_fit_decreasing, trained_tokens
from lora_trainer.data.text import IGNORE_INDEX, Example

PAD = 0


def example(n: int, prompt: int = 0, start: int = 1) -> Example:
    """n tokens; the first `prompt` carry no loss (a completion-only sample)."""
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:])


@pytest.mark.parametrize("seed", range(5))
def test_rows_hold_every_sample_once_and_never_overflow(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 64) for _ in range(200)]
    rows = best_fit_decreasing(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # best fit leaves little room: few rows past the minimum the tokens need
    assert len(rows) <= sum(lengths) // 64 + len(lengths) // 10
    assert best_fit_decreasing(lengths, 64) == rows  # deterministic


def test_best_fit_puts_a_sample_into_the_fullest_row_with_room():
    # longest first: 6, 5, 4, 3, 2 -> rows [6], [5], then 4 fits only beside 5 (room 5) or 6 (room 4): 6 is fuller
    assert best_fit_decreasing([3, 6, 2, 5, 4], 10) == [(1, 4), (3, 0, 2)]


def test_a_packed_row_restarts_positions_masks_each_first_label_and_pads_after_the_last_sample():
    a, b, c = example(4, prompt=2, start=10), example(3, start=20), example(5, start=30)
    packed = Packed([a, b, c], capacity=8, pad_id=PAD)
    assert packed.rows == [(2, 1), (0,)]
    batch = packed.collate([[c, b], [a]])
    assert batch["input_ids"].tolist() == [[30, 31, 32, 33, 34, 20, 21, 22], [10, 11, 12, 13, PAD, PAD, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, 31, 32, 33, 34, x, 21, 22], [x, x, 12, 13, x, x, x, x]]
    assert "attention_mask" not in batch  # attention follows the positions (transformers' packed sequences)
    assert Packed.samples(batch) == 3


def test_packing_keeps_each_samples_trained_tokens():
    samples = [example(n, prompt=n // 3) for n in (9, 4, 7, 2, 6)]
    packed = Packed(samples, capacity=12, pad_id=PAD)
    padded = Padded(samples, pad_id=PAD)
    assert sum(packed.item_weights()) == sum(padded.item_weights()) == sum(trained_tokens(s) for s in samples)
    rows = packed.collate([[samples[i] for i in row] for row in packed.rows])
    singles = padded.collate(samples)
    trained = int((rows["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert trained == int((singles["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert packed.summary()["packed_rows"] == len(packed.rows) < len(samples)
    assert Padded.samples(singles) == Packed.samples(rows) == len(samples)


def test_padded_batches_are_unchanged():
    batch = Padded([example(3), example(1)], pad_id=PAD).collate([example(3), example(1)])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert torch.equal(batch["input_ids"][1], torch.tensor([1, PAD, PAD]))
