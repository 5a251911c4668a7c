"""Loop options: gradient checkpointing, mixed precision, accumulation, schedules, clipping, progress output."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.observers import ProgressReporter, RunInfo, StepStats, format_step_line

from .conftest import LLM_BASE, SD_BASE, run


@pytest.mark.parametrize("base", [SD_BASE, LLM_BASE], ids=["sd", "llm"])
def test_gradient_checkpointing_computes_the_same_training(tmp_path, base):
    plain = run(base, tmp_path / "plain", max_train_steps=3, save_steps=0)
    checkpointed = run(base, tmp_path / "ckpt", max_train_steps=3, save_steps=0, gradient_checkpointing=True)
    a = torch.tensor([v for _, v in plain.summary.losses])
    b = torch.tensor([v for _, v in checkpointed.summary.losses])
    assert torch.allclose(a, b, rtol=1e-5)


@pytest.mark.parametrize("base", [SD_BASE, LLM_BASE], ids=["sd", "llm"])
def test_bf16_autocast_trains_on_cpu(tmp_path, base):
    recipe = run(base, tmp_path, max_train_steps=2, save_steps=0, mixed_precision="bf16")
    assert all(math.isfinite(v) for _, v in recipe.summary.losses)
    assert all(p.dtype == torch.float32 for p in recipe.params)  # LoRA weights stay fp32


def test_fp16_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="mixed_precision: fp16 needs a CUDA GPU"):
        run(SD_BASE, tmp_path, mixed_precision="fp16")


def test_accumulation_warmup_schedule_and_clipping(tmp_path):
    recipe = run(
        SD_BASE,
        tmp_path,
        max_train_steps=4,
        save_steps=0,
        gradient_accumulation_steps=3,
        lr_scheduler="linear",
        lr_warmup_steps=2,
        learning_rate=1e-3,
        max_grad_norm=1e-6,
    )
    # 8 images / batch 2 = 4 batches per epoch -> 2 optimizer steps per epoch (groups of 3 and 1)
    assert recipe.plan.step_groups() == [3, 1] and recipe.epochs == 2
    assert recipe.summary.samples == 2 * 8
    lrs = [g["lr"] for g in recipe.optimizer.param_groups]
    assert lrs == [0.0]  # linear decay reaches 0 at the last step
    total = (
        torch.sqrt(sum((p.grad.float() ** 2).sum() for p in recipe.params if p.grad is not None))
        if any(p.grad is not None for p in recipe.params)
        else torch.tensor(0.0)
    )
    assert float(total) == 0.0  # gradients are cleared after each step


def stats(step: int) -> StepStats:
    return StepStats(
        step=step,
        total_steps=20,
        epoch=1,
        epochs=2,
        loss=0.1234,
        learning_rate=1e-4,
        grad_norm=0.5,
        samples=4,
        tokens=0,
        step_seconds=0.5,
        eta_seconds=65,
    )


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_plain_log_lines_when_not_a_terminal():
    reporter = ProgressReporter(every=10, stream=io.StringIO())
    info = RunInfo(total_steps=20, start_step=0, epochs=2, device="cpu", trainable_parameters=10)
    logger, handler = logging.getLogger("lora_trainer"), Collect()
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:], logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    try:
        reporter.on_start(info)
        for step in range(1, 21):
            reporter.on_step(stats(step))
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])
    lines = [m for m in handler.messages if m.startswith("step ")]
    assert len(lines) == 2 and lines[0].startswith("step 10/20 epoch 1/2 loss=0.1234 lr=1.00e-04")
    assert "2.00 it/s" in lines[0] and "8.00 samples/s" in lines[0] and "eta 0:01:05" in lines[0]


def test_auto_label_progress_is_logged_each_tenth():
    reporter = ProgressReporter(every=10, stream=FakeTerminal())
    logger, handler = logging.getLogger("lora_trainer"), Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for done in (0, *range(8, 97, 8), 100, 100):
            reporter.on_labeling(done, 100)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    counts = [int(m.split()[1].split("/")[0]) for m in handler.messages if m.startswith("auto_label:")]
    assert counts == [16, 24, 32, 40, 56, 64, 72, 80, 96, 100]  # a line per tenth crossed, the end once


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_on_a_terminal():
    stream = FakeTerminal()
    reporter = ProgressReporter(every=10, stream=stream)
    reporter.on_start(RunInfo(total_steps=20, start_step=5, epochs=2, device="cpu", trainable_parameters=10))
    for step in range(6, 21):
        reporter.on_step(stats(step))
    reporter.on_end(None)
    out = stream.getvalue()
    assert "20/20" in out and "loss=0.1234" in out and "\r" in out  # a redrawn bar, not log lines
    assert format_step_line(stats(1)) not in out
