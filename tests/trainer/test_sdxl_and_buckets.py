"""SDXL-architecture LoRA and aspect-ratio bucketing with the tiny presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_trainer.errors import ConfigError
from lora_trainer.observers import BaseObserver
from lora_trainer.presets import preset_path

from .conftest import SD_BASE, assert_resumes_exactly, run

SDXL_BASE = {**SD_BASE, "base_model": "preset:tiny-sdxl"}
SHAPES = [(48, 32), (32, 48), (40, 40), (64, 32), (32, 64), (48, 48), (56, 32), (32, 32)]


@pytest.fixture
def mixed_shapes(tmp_path) -> Path:
    """Images of several aspect ratios with .txt captions."""
    folder = tmp_path / "shapes"
    folder.mkdir()
    for i, (w, h) in enumerate(SHAPES):
        Image.effect_noise((w, h), 30 + i).convert("RGB").save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {w} by {h} picture")
    return folder


BUCKETS = dict(enable_bucket=True, resolution=32, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=8)


def test_sdxl_lora_on_unet_and_both_text_encoders_loads_in_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    recipe = run(
        SDXL_BASE,
        tmp_path,
        train_text_encoder=True,
        network_alpha=2,
        learning_rate=5e-2,
        max_train_steps=3,
        save_steps=0,
    )
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert meta["model_family"] == "sdxl"
    assert json.loads(meta["lora_adapter_metadata"])["text_encoder_2.lora_alpha"] == 2.0
    pipe = StableDiffusionXLPipeline.from_pretrained(preset_path("preset:tiny-sdxl"))
    pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    sample, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 80)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}
    trained = recipe.task.family.parts.denoiser.eval()
    with torch.no_grad():
        assert torch.allclose(
            pipe.unet(sample, t, text, added_cond_kwargs=added).sample,
            trained(sample, t, text, added_cond_kwargs=added).sample,
            atol=1e-5,
        )
        ids = pipe.tokenizer_2("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
        loaded_te2 = pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
        trained_te2 = recipe.task.family.parts.text_encoders[1].eval()(ids, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(loaded_te2, trained_te2, atol=1e-5)


def test_sdxl_time_ids_carry_original_size_and_crop(tmp_path, mixed_shapes):
    recipe = run(
        SDXL_BASE,
        tmp_path,
        train_data_dir=str(mixed_shapes),
        max_train_steps=1,
        save_steps=0,
        center_crop=True,
        batch_size=8,
        resolution=32,
    )
    task = recipe.task
    dataset = task.dataset()
    batch = task.collate([dataset[(i, 0)] for i in range(len(dataset))])
    with torch.no_grad():
        _, added = task.family.denoiser_inputs(task.family.encode_prompts(batch), batch)
    time_ids = added["time_ids"]  # (B, 6): original (h, w), crop (top, left), target (h, w)
    assert time_ids[0].tolist() == [32.0, 48.0, 0.0, 8.0, 32.0, 32.0]  # 48x32 scaled to 48x32, centre cut
    assert time_ids[1].tolist() == [48.0, 32.0, 8.0, 0.0, 32.0, 32.0]
    assert added["text_embeds"].shape == (8, 32)


def test_captions_tokenized_up_front_match_tokenizing_each_alone(tmp_path, mixed_shapes):
    recipe = run(SDXL_BASE, tmp_path, train_data_dir=str(mixed_shapes), max_train_steps=1, save_steps=0)
    task = recipe.task
    captions = ["a red circle", "a red circle", "word " * 200, ""]  # a repeat, one past 77 tokens, an empty one
    for caption, ids in zip(captions, task.family.token_inputs(captions), strict=True):
        assert set(ids) == {"input_ids", "input_ids_2"}
        for key, tokenizer in zip(("input_ids", "input_ids_2"), task.family.parts.tokenizers):
            alone = tokenizer(caption, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
            assert torch.equal(ids[key], alone.input_ids[0])
    dataset = task.dataset()
    for i, record in enumerate(task.records):
        assert torch.equal(dataset[(i, 0)]["input_ids"], task.family.token_inputs([record.caption])[0]["input_ids"])


def test_buckets_keep_shapes_and_batches_never_mix(tmp_path, mixed_shapes):
    sizes = []

    class Spy(BaseObserver):
        def on_start(self, info):
            sizes.append(info.data_summary["buckets"])

    recipe = run(
        SD_BASE,
        tmp_path,
        train_data_dir=str(mixed_shapes),
        max_train_steps=4,
        save_steps=0,
        batch_size=2,
        observers=[Spy()],
        **BUCKETS,
    )
    task = recipe.task
    assert task.sizes[0] == (40, 24) and task.sizes[1] == (24, 40) and task.sizes[2] == (32, 32)
    assert sizes == ["24x40: 2, 32x32: 3, 40x24: 3"]
    for batch in recipe.plan.batches(seed=SD_BASE["seed"], epoch=0):
        assert len({task.sizes[i] for i in batch}) == 1
    item = task.dataset()[(0, 0)]
    assert item["pixel_values"].shape == (3, 24, 40)  # (C, H, W) of the 40x24 bucket: nothing squashed


def test_bucketed_sdxl_run_resumes_bit_for_bit(tmp_path, mixed_shapes):
    assert_resumes_exactly(
        SDXL_BASE,
        tmp_path,
        train_data_dir=str(mixed_shapes),
        max_train_steps=6,
        save_steps=2,
        random_flip=True,
        **BUCKETS,
    )


def test_sizes_that_the_vae_cannot_halve_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="training sizes 33x33 are not multiples of 2, the VAE's downscale factor"):
        run(SD_BASE, tmp_path, resolution=33, max_train_steps=1)


def test_resolution_outside_the_bucket_range_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'resolution' \\(32\\) must lie between 'min_bucket_reso' \\(40\\)"):
        run(SD_BASE, tmp_path, **{**BUCKETS, "min_bucket_reso": 40})
