"""Stable Diffusion LoRA with the tiny preset: outputs, keys, loading in diffusers, learning."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lora_trainer.config import config_to_yaml

from .conftest import SD_BASE, generate, make_config, run, tiny_sd_pipeline
from .test_families import draws


def files_under(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "logs" not in p.parts}


def test_output_folder_has_exactly_the_documented_files(tmp_path):
    out = tmp_path / "run"
    recipe = run(SD_BASE, out, max_train_steps=6, save_steps=2, keep_checkpoints=2, save_formats=["diffusers"])
    state = {
        f"checkpoints/state_step_{s}/{n}"
        for s in (2, 4)
        for n in ("manifest.json", "optimizer.safetensors", "rng.safetensors", "state.json")
    }
    assert files_under(out) == {
        "pytorch_lora_weights.safetensors",
        "config_backup.yaml",
        ".lora-owner.json",
        "EXPERIMENT.md",
        "loss_curve.png",
        "checkpoints/pytorch_lora_weights_final.safetensors",
        "checkpoints/pytorch_lora_weights_step_2.safetensors",
        "checkpoints/pytorch_lora_weights_step_4.safetensors",
        *state,
    }
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1
    assert (out / "config_backup.yaml").read_text() == config_to_yaml(recipe.cfg)
    assert yaml.safe_load((out / "config_backup.yaml").read_text())["lora_rank"] == 4


def test_every_saved_key_is_a_lora_key_with_metadata(tmp_path):
    run(SD_BASE, tmp_path, network_alpha=2, train_text_encoder=True, max_train_steps=2)
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    lora_suffixes = (
        ".lora.down.weight",
        ".lora.up.weight",  # UNet, as diffusers' scripts write
        ".lora_linear_layer.down.weight",
        ".lora_linear_layer.up.weight",
    )  # CLIP, likewise
    assert keys and all(k.endswith(lora_suffixes) for k in keys)
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}
    assert any(".to_q." in k for k in keys) and any(".q_proj." in k for k in keys)
    # the classic spelling transformers < 5.6 stacks load (transformers >= 5.6 flattens CLIP's modules)
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys if k.startswith("text_encoder"))
    assert (meta["rank"], meta["alpha"], meta["base_model"], meta["task_type"]) == (
        "4",
        "2",
        "preset:tiny-sd",
        "text-to-image",
    )
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert (adapter["unet.r"], adapter["unet.lora_alpha"], adapter["text_encoder.lora_alpha"]) == (4, 2.0, 2.0)


def test_tensorboard_has_the_documented_scalars(tmp_path):
    run(SD_BASE, tmp_path, max_train_steps=3)
    events = EventAccumulator(str(tmp_path / "logs")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "learning_rate", "grad_norm"} <= tags
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2, 3]


def test_diffusers_load_lora_weights_loads_the_file_and_changes_the_output(tmp_path):
    recipe = run(SD_BASE, tmp_path, network_alpha=2, learning_rate=5e-2, max_train_steps=3)
    pipe = tiny_sd_pipeline()
    before = generate(pipe)
    pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    after = generate(pipe)
    assert not torch.allclose(before, after, atol=1e-4)
    # alpha != rank survives: the loaded UNet computes exactly what the trained one does
    trained = recipe.task.family.parts.denoiser.eval()
    sample, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(pipe.unet(sample, t, text).sample, trained(sample, t, text).sample, atol=1e-5)


# attention, feed-forward and ResNet convs: enough capacity to overfit eight images on a random UNet
WIDE_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
]


def fixed_eval_loss(recipe) -> float:
    """Mean loss over the whole dataset with a fixed noise/timestep draw: comparable across weights."""
    task = recipe.task
    dataset = task.dataset()
    batch = task.collate([dataset[(i, 0)] for i in range(len(dataset))])
    with torch.no_grad():
        return float(task.loss(batch, draws(123, batch)))


def test_loss_falls_when_overfitting_a_tiny_set(tmp_path):
    cfg_overrides = dict(
        max_train_steps=60,
        learning_rate=1e-2,
        lora_rank=8,
        batch_size=8,
        save_steps=0,
        center_crop=True,
        resolution=16,
        target_modules=WIDE_TARGETS,
    )
    from lora_trainer.recipe import TrainingRecipe

    cfg = make_config(SD_BASE, tmp_path, **cfg_overrides)
    untrained = TrainingRecipe(cfg, observers=[])
    untrained.setup()
    before = fixed_eval_loss(untrained)
    trained = run(SD_BASE, tmp_path / "trained", **cfg_overrides)
    after = fixed_eval_loss(trained)
    assert after < 0.5 * before, (before, after)  # measured: 1.139 -> 0.329


@pytest.mark.parametrize("option", [{"snr_gamma": 5.0}, {"prediction_type": "v_prediction"}, {"noise_offset": 0.1}])
def test_loss_options_train(tmp_path, option):
    recipe = run(SD_BASE, tmp_path, max_train_steps=2, save_steps=0, **option)
    assert recipe.summary.step == 2 and recipe.summary.loss > 0
