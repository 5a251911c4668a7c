"""EXPERIMENT.md: its sections, numbers equal to the run's TensorBoard scalars, the loss curve, and a
record also for runs that failed (in setup, or mid-run), but never over another run's record."""

from __future__ import annotations

import hashlib
import math
import re
import shutil

import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_trainer.cli import main
from lora_trainer.errors import DivergedError, ExitCode
from lora_trainer.experiment import RunProblems, ema, loss_not_falling
from lora_trainer.observers import BaseObserver

from .conftest import LLM_BASE, SAMPLE, SD_BASE, run

SECTIONS = [
    "## Purpose",
    "## Dataset",
    "## Parameters",
    "## Command",
    "## Hardware",
    "## Training",
    "## Outputs",
    "## Problems",
]


def field(text: str, name: str) -> str:
    """The value of the first table row named `name`."""
    match = re.search(rf"^\| {re.escape(name)} \| (.+?) \|$", text, re.MULTILINE)
    assert match, f"no row {name!r} in:\n{text}"
    return match.group(1)


def scalars(out, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(out / "logs")).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def close(text: str, value: float) -> bool:
    return math.isclose(float(text.split()[0]), value, rel_tol=1e-5)


def train_with_cli(tmp_path, monkeypatch, base: dict, **overrides) -> int:
    config = {**base, "output_dir": str(tmp_path / "out"), **overrides}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["--config", str(path)]
    monkeypatch.setattr("sys.argv", ["/venv/bin/lora-train", *argv])
    return main(argv)


def test_record_of_a_finished_run_matches_its_tensorboard_scalars(tmp_path, monkeypatch):
    code = train_with_cli(
        tmp_path,
        monkeypatch,
        SD_BASE,
        max_train_steps=6,
        save_steps=2,
        output_name="shapes",
        description="Can a rank-4 LoRA learn eight coloured shapes?",
    )
    assert code == ExitCode.OK
    out = tmp_path / "out"
    text = (out / "EXPERIMENT.md").read_text()
    assert re.match(r"# Experiment shapes-\d{8}-\d{6}-[0-9a-f]{8}\n", text)
    assert [line for line in text.splitlines() if line.startswith("## ")] == SECTIONS
    assert field(text, "Status") == "Succeeded"
    assert field(text, "Purpose") == "Can a rank-4 LoRA learn eight coloured shapes?"
    losses, rates = scalars(out, "loss/train"), scalars(out, "learning_rate")
    assert [s for s, _ in losses] == list(range(1, 7))
    assert field(text, "Steps") == "6 / 6"
    assert close(field(text, "Final loss"), losses[-1][1])
    best_step, best = min(losses, key=lambda item: item[1])
    assert close(field(text, "Best loss"), best) and field(text, "Best loss").endswith(f"(step {best_step})")
    assert close(field(text, "Final learning rate"), rates[-1][1])
    assert field(text, "images") == "8" and field(text, "caption_source") == "metadata.csv"
    assert field(text, "lora_rank") == "4" and field(text, "effective batch size") == "2"
    assert "```console\nlora-train --config " + str(tmp_path / "cfg.yaml") + "\n```" in text
    assert field(text, "Device") == "cpu"
    assert "Checkpoints written at steps: 2, 4" in text
    for name in ("pytorch_lora_weights.safetensors", "shapes.kohya.safetensors"):
        digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert f"| `{name}` |" in text and digest[:16] in text
    assert "## Problems\n\nNone seen." in text
    assert "![Training loss](loss_curve.png)" in text
    with Image.open(out / "loss_curve.png") as image:
        assert image.format == "PNG" and image.size == (800, 450)


def test_record_of_a_text_generation_run_has_token_counts(tmp_path):
    recipe = run(LLM_BASE, tmp_path, max_train_steps=2, save_steps=0)
    text = (tmp_path / "EXPERIMENT.md").read_text()
    summary = recipe.summary.data_summary
    assert field(text, "records") == str(summary["records"]) and field(text, "tokens_max") == str(summary["tokens_max"])
    assert field(text, "Tokens trained") == str(recipe.summary.tokens)
    assert field(text, "max_seq_length") == "64"
    assert "| resolution |" not in text.split("## Parameters")[1].split("## Command")[0]


def test_a_run_failing_in_setup_still_gets_a_record(tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE / "images", data)
    (data / "metadata.csv").unlink()
    code = train_with_cli(tmp_path, monkeypatch, SD_BASE, train_data_dir=str(data))
    assert code == ExitCode.DATASET_INVALID
    text = (tmp_path / "out" / "EXPERIMENT.md").read_text()
    assert field(text, "Status") == "Failed (DatasetInvalid)"
    assert "- **DatasetInvalid**: 8 of 8 image(s) have no caption" in text
    assert "The dataset was not summarized" in text and "No final weights were written." in text
    assert field(text, "Device") == "(the run stopped before choosing one)"
    assert field(text, "Final loss") == "n/a"
    assert not (tmp_path / "out" / "loss_curve.png").exists()


def test_a_config_error_writes_nothing_and_does_not_break(tmp_path, monkeypatch):
    assert train_with_cli(tmp_path, monkeypatch, SD_BASE, lora_rnak=4) == ExitCode.CONFIG_INVALID
    assert not (tmp_path / "out").exists()


def test_a_refused_run_leaves_the_finished_runs_record_alone(tmp_path, monkeypatch):
    assert train_with_cli(tmp_path, monkeypatch, SD_BASE, max_train_steps=1, save_steps=0) == ExitCode.OK
    before = (tmp_path / "out" / "EXPERIMENT.md").read_bytes()
    assert train_with_cli(tmp_path, monkeypatch, SD_BASE, max_train_steps=1, save_steps=0) == ExitCode.CONFIG_INVALID
    assert (tmp_path / "out" / "EXPERIMENT.md").read_bytes() == before


class DivergeAt(BaseObserver):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, stats) -> None:
        if stats.step == self.step:
            raise DivergedError(f"loss became nan at step {stats.step}")


def test_a_run_failing_mid_way_records_the_error_and_the_curve_so_far(tmp_path):
    with pytest.raises(DivergedError):
        run(SD_BASE, tmp_path, observers=[DivergeAt(3)], max_train_steps=6, save_steps=2)
    text = (tmp_path / "EXPERIMENT.md").read_text()
    assert field(text, "Status") == "Failed (TrainingDiverged)"
    assert "- **TrainingDiverged**: loss became nan at step 3" in text
    assert field(text, "Steps") == "3 / 6" and (tmp_path / "loss_curve.png").is_file()
    assert "Checkpoints written at steps: 2" in text


def test_an_interrupted_run_says_so(tmp_path):
    with pytest.raises(Exception, match="SIGTERM"):
        run(SD_BASE, tmp_path, stop_at=2, max_train_steps=6, save_steps=0)
    assert field((tmp_path / "EXPERIMENT.md").read_text(), "Status").startswith("Interrupted at step 2")


@pytest.mark.parametrize(
    "losses, seconds, spikes, stalls",
    [
        ([1.0] * 12, [0.1] * 12, [], []),
        ([1.0] * 12 + [5.0], [0.1] * 13, [13], []),  # 5x the median: a spike
        ([1.0] * 12 + [3.0], [0.1] * 13, [], []),  # 3x: noise in diffusion losses, not a spike
        ([1.0] * 5 + [9.0], [0.1] * 6, [], []),  # too little history to judge
        ([1.0] * 12, [0.1] * 11 + [2.0], [], [12]),  # a step 20x slower than usual: a stall
    ],
)
def test_spikes_and_stalls(losses, seconds, spikes, stalls):
    problems = RunProblems()
    for step, (loss, sec) in enumerate(zip(losses, seconds), start=1):
        problems.see(step, loss, sec)
    assert [s for s, _, _ in problems.spikes] == spikes and [s for s, _, _ in problems.stalls] == stalls


@pytest.mark.parametrize(
    "values, flat",
    [
        ([1.0 - i / 100 for i in range(40)], False),
        ([0.5] * 40, True),
        ([0.5 + i / 100 for i in range(40)], True),
        ([0.5] * 10, False),  # too short to say
    ],
)
def test_loss_not_falling(values, flat):
    assert (loss_not_falling(list(enumerate(values, start=1))) is not None) == flat


def test_ema_is_debiased_like_tensorboard():
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_record_shows_validation_losses_and_samples(tmp_path):
    run(LLM_BASE, tmp_path / "llm", max_train_steps=4, save_steps=0, validation_split=0.25, validation_steps=2)
    text = (tmp_path / "llm" / "EXPERIMENT.md").read_text()
    validation = scalars(tmp_path / "llm", "loss/validation")
    assert [s for s, _ in validation] == [2, 4]
    assert close(field(text, "Final validation loss"), validation[-1][1])
    run(
        SD_BASE,
        tmp_path / "sd",
        max_train_steps=2,
        save_steps=0,
        validation_prompts=["a red circle"],
        validation_steps=2,
        validation_inference_steps=2,
    )
    assert "Validation samples: 1 image(s) under `samples/`" in (tmp_path / "sd" / "EXPERIMENT.md").read_text()
