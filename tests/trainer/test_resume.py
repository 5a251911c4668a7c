"""Exact resume: stopped at a step and resumed, a run ends bit for bit where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lora_trainer.checkpoint import sha256_file
from lora_trainer.errors import ConfigError, Interrupted
from lora_trainer.presets import preset_path

from .conftest import LLM_BASE, SD_BASE, assert_resumes_exactly, assert_same_weights, final_weights, run


@pytest.mark.parametrize(
    "base, overrides",
    [
        (SD_BASE, dict(random_flip=True, lr_scheduler="cosine", lr_warmup_steps=2, lora_dropout=0.1)),
        (SD_BASE, dict(gradient_accumulation_steps=2, num_workers=2, snr_gamma=5.0, train_text_encoder=True)),
        (LLM_BASE, dict(lr_scheduler="linear", lora_dropout=0.1)),
    ],
    ids=["sd-flip-cosine-dropout", "sd-accumulation-workers", "llm"],
)
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, base, overrides):
    assert_resumes_exactly(base, tmp_path, max_train_steps=6, save_steps=2, **overrides)


def test_resume_from_an_explicit_checkpoint_folder(tmp_path):
    settings = dict(max_train_steps=4, save_steps=2)
    straight = run(SD_BASE, tmp_path / "a", **settings)
    with pytest.raises(Interrupted):
        run(SD_BASE, tmp_path / "b", stop_at=3, **settings)
    resumed = run(SD_BASE, tmp_path / "b", resume=str(tmp_path / "b/checkpoints/state_step_2"), **settings)
    assert resumed.summary.resumed_from == 2
    assert_same_weights(final_weights(tmp_path / "b"), final_weights(tmp_path / "a"))
    assert resumed.summary.losses == straight.summary.losses


def test_resume_with_a_different_data_plan_is_refused(tmp_path):
    with pytest.raises(Interrupted):
        run(SD_BASE, tmp_path, stop_at=2, max_train_steps=4)
    with pytest.raises(ConfigError, match="batch_size 2 -> 4"):
        run(SD_BASE, tmp_path, resume="latest", max_train_steps=4, batch_size=4)


def test_earlier_runs_are_never_mixed_or_overwritten_by_accident(tmp_path):
    with pytest.raises(Interrupted):
        run(SD_BASE, tmp_path, stop_at=2, max_train_steps=4)
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run .* set resume: latest"):
        run(SD_BASE, tmp_path, max_train_steps=4)
    run(SD_BASE, tmp_path, resume="latest", max_train_steps=4)
    with pytest.raises(ConfigError, match="holds a finished run"):
        run(SD_BASE, tmp_path, max_train_steps=4)
    (tmp_path / "notes.txt").write_text("mine")
    run(SD_BASE, tmp_path, max_train_steps=2, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "checkpoints/state_step_2").exists()  # save_steps=2 == last step: only final


def test_the_same_run_twice_writes_byte_identical_weight_files(tmp_path):
    """So the sha256 in EXPERIMENT.md identifies the weights. The kohya file differs only by its
    modelspec.date (the training date, as kohya's scripts write it)."""
    for name in ("first", "second"):
        run(SD_BASE, tmp_path / name, max_train_steps=2, save_steps=0, output_name="shapes")
    first, second = (tmp_path / "first", tmp_path / "second")
    weights = "pytorch_lora_weights.safetensors"
    assert sha256_file(first / weights) == sha256_file(second / weights)
    kohya = [safe_open(str(folder / "shapes.kohya.safetensors"), "pt") for folder in (first, second)]
    dated = [{**k.metadata(), "modelspec.date": ""} for k in kohya]
    assert dated[0] == dated[1] and kohya[0].keys() == kohya[1].keys()
    assert all(kohya[0].get_tensor(key).equal(kohya[1].get_tensor(key)) for key in kohya[0].keys())  # noqa: SIM118


def test_a_run_that_builds_its_preset_trains_like_one_that_finds_it_built(tmp_path, monkeypatch):
    """Building a preset seeds torch for its random weights. That must not reach the run: the LoRA init
    (drawn from the global RNG) would then depend on the cache, as it did on fresh machines in CI."""
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "empty-cache"))
    first = run(SD_BASE, tmp_path / "built-now", max_train_steps=3, save_steps=0)  # builds tiny-sd
    assert (tmp_path / "empty-cache" / "presets").is_dir()
    second = run(SD_BASE, tmp_path / "found-built", max_train_steps=3, save_steps=0)
    assert first.summary.losses == second.summary.losses
    assert_same_weights(final_weights(tmp_path / "built-now"), final_weights(tmp_path / "found-built"))


def test_building_a_preset_leaves_the_callers_rng_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "empty-cache"))
    before = torch.get_rng_state()
    preset_path("preset:tiny-llm")
    assert torch.get_rng_state().equal(before)
