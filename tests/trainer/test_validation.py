"""Validation during training: sample images for fixed prompts, held-out loss; never perturbs training."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_trainer.errors import ConfigError

from .conftest import LLM_BASE, SD_BASE, run
from .test_sdxl_and_buckets import SDXL_BASE

PROMPTS = dict(
    validation_prompts=["a red circle", "a blue square"],
    validation_steps=2,
    validation_inference_steps=2,
    validation_guidance_scale=3.0,
)


def test_samples_for_fixed_prompts_are_saved_and_logged(tmp_path):
    run(SD_BASE, tmp_path / "a", max_train_steps=4, save_steps=0, learning_rate=5e-2, **PROMPTS)
    samples = tmp_path / "a" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "prompts.txt",
        "step_2_0.png",
        "step_2_1.png",
        "step_4_0.png",
        "step_4_1.png",
    ]
    assert (samples / "prompts.txt").read_text() == "0: a red circle\n1: a blue square\n"
    assert (samples / "step_2_0.png").read_bytes() != (samples / "step_4_0.png").read_bytes()  # it learned
    events = EventAccumulator(str(tmp_path / "a" / "logs"), size_guidance={"images": 0}).Reload()
    assert {"validation/0", "validation/1"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("validation/0")] == [2, 4]
    run(SD_BASE, tmp_path / "b", max_train_steps=4, save_steps=0, learning_rate=5e-2, **PROMPTS)
    for name in ("step_2_0.png", "step_4_1.png"):  # a fixed seed: the same images run after run
        assert (tmp_path / "b" / "samples" / name).read_bytes() == (samples / name).read_bytes()


def test_validation_does_not_change_training(tmp_path):
    settings = dict(max_train_steps=4, save_steps=0, lora_dropout=0.1, random_flip=True)
    plain = run(SD_BASE, tmp_path / "plain", **settings)
    validated = run(SD_BASE, tmp_path / "validated", **settings, **PROMPTS)
    assert validated.summary.losses == plain.summary.losses


def test_sdxl_samples(tmp_path):
    run(
        SDXL_BASE,
        tmp_path,
        max_train_steps=2,
        save_steps=0,
        resolution=32,
        **{**PROMPTS, "validation_prompts": ["a green square"]},
    )
    assert (tmp_path / "samples" / "step_2_0.png").is_file()


def test_held_out_loss_for_text_generation(tmp_path):
    recipe = run(
        LLM_BASE,
        tmp_path,
        max_train_steps=6,
        save_steps=0,
        learning_rate=1e-2,
        validation_split=0.25,
        validation_steps=3,
        target_modules=["q_proj", "v_proj", "lm_head"],
    )
    summary = recipe.summary.data_summary
    assert summary["validation_examples"] == 13 and summary["examples"] == 39
    events = EventAccumulator(str(tmp_path / "logs")).Reload()
    losses = events.Scalars("loss/validation")
    assert [e.step for e in losses] == [3, 6]
    assert losses[1].value < losses[0].value


def test_validation_data_file(tmp_path):
    recipe = run(
        LLM_BASE,
        tmp_path,
        max_train_steps=2,
        save_steps=0,
        validation_steps=1,
        validation_data=LLM_BASE["train_data_dir"] + "/chat.jsonl",
    )
    assert recipe.summary.data_summary["validation_examples"] == 4


@pytest.mark.parametrize(
    "base, settings, message",
    [
        (LLM_BASE, dict(validation_prompts=["x"]), "'validation_prompts' applies to text-to-image"),
        (LLM_BASE, dict(validation_data="x.jsonl", validation_split=0.1), "'validation_data' or 'validation_split'"),
        (LLM_BASE, dict(validation_split=0.9), "'validation_split': must be <= 0.5"),
    ],
)
def test_bad_validation_settings(tmp_path, base, settings, message):
    with pytest.raises(ConfigError, match=message):
        run(base, tmp_path, **settings)
