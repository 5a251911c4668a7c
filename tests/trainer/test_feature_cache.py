"""Cached VAE latents and text-encoder outputs: same training, reused across runs, never stale."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from lora_trainer.errors import ConfigError

from .conftest import SAMPLE, SD_BASE, assert_resumes_exactly, final_weights, run
from .test_sdxl_and_buckets import SDXL_BASE

CACHED = dict(cache_latents=True, cache_text_encoder_outputs=True, center_crop=True, random_flip=True)


def entries(cache_dir) -> dict[str, float]:
    return {str(p.relative_to(cache_dir)): p.stat().st_mtime_ns for p in cache_dir.rglob("*.safetensors")}


@pytest.mark.parametrize("base", [SD_BASE, SDXL_BASE], ids=["sd", "sdxl"])
def test_cached_run_trains_like_the_uncached_one(tmp_path, base):
    # batched vs per-item encoding rounds differently (features agree to ~1e-7). With AdamW's default
    # epsilon (1e-8), rounding in near-zero gradients becomes moves of up to lr; epsilon 1e-3 keeps the update
    # proportional to the gradient, so the two runs must agree as closely as their features do
    settings = dict(max_train_steps=4, save_steps=0, center_crop=True, random_flip=True, adam_epsilon=1e-3)
    plain = run(base, tmp_path / "plain", **settings)
    cached = run(base, tmp_path / "cached", cache_dir=str(tmp_path / "cache"), **{**settings, **CACHED})
    got, want = cached.summary.losses, plain.summary.losses
    assert [s for s, _ in got] == [s for s, _ in want]
    assert torch.allclose(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]), rtol=1e-5)
    a, b = final_weights(tmp_path / "cached"), final_weights(tmp_path / "plain")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # measured at most 4e-8
    assert max(a[k].abs().max() for k in a if ".lora.up." in k) > 1e-4  # and training did move the weights
    # 8 images x (plain, flipped) latents + 8 distinct captions
    assert len(entries(tmp_path / "cache")) == 8 * 2 + 8


def test_cache_is_reused_across_runs_and_follows_content(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE / "images", data)
    settings = dict(
        train_data_dir=str(data), cache_dir=str(tmp_path / "cache"), max_train_steps=2, save_steps=0, **CACHED
    )
    run(SD_BASE, tmp_path / "one", **settings)
    first = entries(tmp_path / "cache")
    run(SD_BASE, tmp_path / "two", **settings)
    assert entries(tmp_path / "cache") == first  # nothing recomputed or rewritten
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "red_circle.png")  # new content, same name
    run(SD_BASE, tmp_path / "three", **settings)
    after = entries(tmp_path / "cache")
    assert set(first) < set(after) and len(after) - len(first) == 2  # that image's plain and flipped latents
    assert all(after[k] == v for k, v in first.items())


def test_a_torn_cache_entry_is_recomputed(tmp_path, caplog):
    settings = dict(cache_dir=str(tmp_path / "cache"), max_train_steps=2, save_steps=0, **CACHED)
    run(SD_BASE, tmp_path / "one", **settings)
    entries_before = entries(tmp_path / "cache")
    victims = sorted((tmp_path / "cache").rglob("*.safetensors"))[::5]  # latents and captions alike
    intact = {v: v.read_bytes() for v in victims}
    for victim in victims:
        victim.write_bytes(intact[victim][:20])
    with caplog.at_level("WARNING", logger="lora_trainer"):
        run(SD_BASE, tmp_path / "two", **settings)  # recomputes, does not crash
    assert caplog.text.count("recomputing it") == len(victims)
    assert all(v.read_bytes() == intact[v] for v in victims)  # the same features again
    assert set(entries(tmp_path / "cache")) == set(entries_before)


def test_cached_run_resumes_bit_for_bit(tmp_path):
    assert_resumes_exactly(
        SD_BASE, tmp_path, cache_dir=str(tmp_path / "cache"), max_train_steps=6, save_steps=2, **CACHED
    )


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(cache_latents=True), "'cache_latents' needs center_crop: true"),
        (
            dict(cache_text_encoder_outputs=True, train_text_encoder=True),
            "'cache_text_encoder_outputs' cannot be used with train_text_encoder",
        ),
    ],
)
def test_cache_settings_that_would_be_stale_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        run(SD_BASE, tmp_path, **settings)
