"""Text-to-image LoRA: image folders with captions, buckets, feature caches and validation images, for any
model family (families/: SD, SDXL, FLUX.1, FLUX.2, SD3, Qwen-Image, Z-Image).

The task owns the data and the caches; the family owns the model (loading, conditioning, latents, the
training objective, LoRA targets and file formats, sampling). The order of loading keeps memory low: text
encoders first, every caption embedded once when the family caches prompts (and the encoders released),
then the denoiser and the VAE.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from ..adapters import autocast, lora_param_groups
from ..compat import Need, PeftThrough
from ..config import TrainConfig
from ..data.cache import TensorCache, image_hashes, key_of, module_fingerprint
from ..data.images import (
    ImageCaptionDataset,
    assign_bucket,
    bucket_sizes,
    collate_images,
    conditioning,
    crop_geometry,
    load_image,
    resize_and_crop,
    to_tensor,
)
from ..data.sampler import group_by
from ..distributed import BatchRandom
from ..errors import ConfigError, ModelError
from ..families import detect_family
from ..families.base import ModelFamily
from ..labeling.auto import scan_captioned_folder
from ..observers import ValidationResult
from ..presets import cache_root
from ..quantization import QuantizedBase
from .base import DataReport

log = logging.getLogger("lora_trainer")

# cache fills encode in batches: big enough to amortize the call, small enough that the VAE's activations at
# 1024 px (the larger of the two) stay below a training step's peak
LATENT_BATCH, TEXT_BATCH = 8, 16


class TextToImageTask:
    weights_format = "diffusers"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.family: ModelFamily | None = None
        self.text_keys: list[str] | None = None

    @staticmethod
    def library_needs(cfg: TrainConfig) -> list[Need]:
        needs: list[Need] = [
            PeftThrough("task_type: text-to-image", "diffusers", "diffusers.utils.constants:MIN_PEFT_VERSION")
        ]
        if cfg.base_quantization != "none":
            needs.append(
                QuantizedBase(cfg.base_quantization, "diffusers", cfg.device, cfg.distributed_strategy)
            )  # the denoiser
        if cfg.quantize_text_encoders:
            needs.append(QuantizedBase(cfg.base_quantization, "transformers", cfg.device, cfg.distributed_strategy))
        if cfg.train_text_encoder:
            needs.append(
                PeftThrough(
                    "train_text_encoder: true", "transformers", "transformers.integrations.peft:MIN_PEFT_VERSION"
                )
            )
        return needs

    # -- data
    def prepare_data(self, labeling=None) -> DataReport:
        cfg = self.cfg
        scan = scan_captioned_folder(cfg, progress=labeling)  # with auto_label, captions what has none first
        self.records, self.original_sizes = scan.records, scan.sizes
        self.family = detect_family(cfg)(cfg)
        self.family.check_config()
        self.family.load_tokenizers()
        self.sizes = self.target_sizes(scan.sizes)
        widths, heights = zip(*scan.sizes)
        summary = {
            "images": len(scan.records),
            "caption_source": scan.caption_source,
            "min_size": f"{min(widths)}x{min(heights)}",
            "max_size": f"{max(widths)}x{max(heights)}",
            "resolution": cfg.resolution,
            **self.family.summary(),
        }
        if cfg.enable_bucket:
            counts = {f"{w}x{h}": self.sizes.count((w, h)) for w, h in sorted(set(self.sizes))}
            summary["buckets"] = ", ".join(f"{k}: {n}" for k, n in counts.items())
        return DataReport(summary=summary, warnings=self.data_warnings(scan.sizes))

    def target_sizes(self, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        cfg = self.cfg
        if not cfg.enable_bucket:
            return [(cfg.resolution, cfg.resolution)] * len(sizes)
        buckets = bucket_sizes(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
        return [assign_bucket(size, buckets) for size in sizes]

    def data_warnings(self, sizes: list[tuple[int, int]]) -> list[str]:
        warnings = []
        tokenizer, limit = self.family.caption_limit()
        long_captions = sum(1 for r in self.records if len(tokenizer(r.caption).input_ids) > limit)
        if long_captions:
            warnings.append(f"{long_captions} caption(s) exceed the text encoder's {limit} tokens and are truncated")
        small = sum(1 for (w, h), (tw, th) in zip(sizes, self.sizes) if w < tw or h < th)
        if small:
            warnings.append(f"{small} image(s) are smaller than their training size and will be upscaled")
        return warnings

    def feature_cache(self) -> TensorCache:
        return TensorCache(self.cfg.cache_dir or cache_root() / "features")

    # -- model
    def load(self, device: torch.device, weight_dtype: torch.dtype, blocks_on_host: bool = False) -> None:
        family = self.family
        family.load_text_encoders(device, weight_dtype)
        if family.cache_prompts:
            self.text_keys = self.fill_text_cache(self.feature_cache())
        family.prepare_sampling(self.cfg.validation_prompts or [])
        if family.cache_prompts and family.releases_text_encoders:
            family.release_text_encoders()
        family.load_denoiser_and_vae(device, weight_dtype, blocks_on_host)
        self.check_sizes(*family.size_multiple())
        family.add_lora()
        self.device = device

    def check_sizes(self, factor: int, why: str) -> None:
        bad = sorted({f"{w}x{h}" for w, h in self.sizes if w % factor or h % factor})
        if bad:
            key = "bucket_reso_steps" if self.cfg.enable_bucket else "resolution"
            raise ConfigError(f"training sizes {', '.join(bad)} are not multiples of {factor}, {why}: change {key}")

    def param_groups(self) -> list[dict[str, Any]]:
        return lora_param_groups(self.family.param_groups())

    def frozen_blocks(self) -> list[torch.nn.Module]:
        return self.family.denoiser_blocks()

    def train_mode(self) -> None:
        self.family.train_mode()

    # -- the dataset and its caches
    def dataset(self) -> torch.utils.data.Dataset:
        cfg = self.cfg
        captions = [r.caption for r in self.records]
        tokens = None if self.text_keys is not None else self.family.token_inputs(captions)
        images = ImageCaptionDataset(self.records, self.sizes, cfg.center_crop, cfg.random_flip, tokens)
        if not (cfg.cache_latents or self.text_keys is not None):
            return images
        latents = self.fill_latent_cache(self.feature_cache()) if cfg.cache_latents else None
        return CachedFeatureDataset(images, self.feature_cache(), latents, self.text_keys, self.original_sizes)

    def fill_latent_cache(self, cache: TensorCache) -> list[tuple[str, str]]:
        """(plain, flipped) cache keys per record; encodes whatever is missing, a bucket at a time."""
        family = self.family
        fingerprint = module_fingerprint(family.parts.vae)
        hashes = image_hashes([r.path for r in self.records])
        keys = [
            tuple(key_of("latent", h, size, flipped, fingerprint) for flipped in (False, True))
            for h, size in zip(hashes, self.sizes)
        ]
        todo = [
            (i, flipped)
            for i, pair in enumerate(keys)
            for flipped in (False, True)
            if (self.cfg.random_flip or not flipped) and not cache.intact(pair[flipped])
        ]
        log.info("latent cache: %d of %d entries to compute", len(todo), len(keys) * (2 if self.cfg.random_flip else 1))
        for size in dict.fromkeys(self.sizes):
            group = [(i, f) for i, f in todo if self.sizes[i] == size]
            for start in range(0, len(group), LATENT_BATCH):
                chunk = group[start : start + LATENT_BATCH]
                pixels = torch.stack([self.fixed_pixels(i, f) for i, f in chunk])  # (B, 3, H, W)
                with torch.no_grad():
                    params = family.encode_images(pixels)  # (B, 2C, ...): mean and logvar
                for (i, f), p in zip(chunk, params):
                    cache.put(keys[i][f], {"latent_dist": p})
        return keys

    def fixed_pixels(self, index: int, flipped: bool) -> torch.Tensor:
        """The pixels of a record with the centre crop (caching requires it), flipped or not."""
        image = load_image(self.records[index].path)
        image, _ = resize_and_crop(image, self.sizes[index], True, flipped, ALWAYS_FLIP)
        return to_tensor(image)

    def fill_text_cache(self, cache: TensorCache) -> list[str]:
        family = self.family
        fingerprints = [module_fingerprint(e) for e in family.parts.text_encoders]
        captions = [r.caption for r in self.records]
        keys = [key_of("text", family.prompt_cache_version(), c, fingerprints) for c in captions]
        todo = [c for c, k in dict(zip(captions, keys)).items() if not cache.intact(k)]
        log.info("text-encoder cache: %d of %d captions to encode", len(todo), len(set(captions)))
        for start in range(0, len(todo), TEXT_BATCH):
            chunk = todo[start : start + TEXT_BATCH]  # the captions of todo are distinct
            with torch.no_grad():
                entries = family.split_prompts(family.encode_prompts(family.prompt_batch(chunk)), len(chunk))
            for caption, entry in zip(chunk, entries):
                cache.put(keys[captions.index(caption)], entry)
        return keys

    def item_groups(self) -> tuple[tuple[int, ...], ...]:
        return group_by(self.sizes)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_images([{k: v for k, v in item.items() if k != "prompt"} for item in items])
        if "prompt" in items[0]:
            batch["prompt"] = self.family.collate_prompts([item["prompt"] for item in items])
        return batch

    # -- one micro-batch
    def loss(self, batch: dict[str, Any], draws: BatchRandom) -> torch.Tensor:
        family, cfg = self.family, self.cfg
        with torch.no_grad():
            params = batch["latent_dist"] if "latent_dist" in batch else family.encode_images(batch["pixel_values"])
            latents = family.latents(params, draws)
        if "prompt" in batch:
            cond = batch["prompt"]
        else:
            with autocast(self.device, cfg.mixed_precision), torch.set_grad_enabled(cfg.train_text_encoder):
                cond = family.encode_prompts(batch)
        return family.loss(latents, cond, batch, draws)

    def item_weights(self) -> list[float]:
        return [1.0] * len(self.records)

    def batch_counts(self, batch: dict[str, Any]) -> tuple[int, int]:
        return batch["original_size"].shape[0], 0

    # -- validation
    def validate(self, step: int) -> ValidationResult | None:
        cfg = self.cfg
        if not cfg.validation_prompts:
            return None
        self.family.eval_mode()
        images = []
        for i, prompt in enumerate(cfg.validation_prompts):
            generator = torch.Generator(self.device).manual_seed(cfg.validation_seed + i)
            with torch.no_grad(), autocast(self.device, cfg.mixed_precision):
                image = self.family.sample(
                    prompt,
                    generator,
                    cfg.resolution,
                    cfg.resolution,
                    cfg.validation_inference_steps,
                    cfg.validation_guidance_scale,
                )
            images.append((prompt, image))
        return ValidationResult(step, images=images)

    # -- weights
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return self.family.lora_state_dict()

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.family.load_lora_state_dict(state)

    def weights_metadata(self) -> dict[str, str]:
        return self.family.weights_metadata()

    def final_files(
        self, out: Path, final_checkpoint: Path, weights: dict[str, torch.Tensor], meta: dict[str, str]
    ) -> list[tuple[Path, str]]:
        """The files in save_formats beside the main one (kohya/ComfyUI); a failure there never undoes the run."""
        if "kohya" not in self.cfg.save_formats:
            return []
        try:
            return self.family.extra_files(out, weights, meta)
        except ModelError as err:
            log.error("the kohya-format file was not written: %s", err)
            return []


class _AlwaysFlip(random.Random):
    """An rng whose coin always says "flip": with a centre crop it is crop_geometry's only draw."""

    def random(self) -> float:
        return 0.0


ALWAYS_FLIP = _AlwaysFlip()


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Serves cached latents and/or text-encoder outputs in place of pixels and caption inputs.

    The flip of an item is decided exactly as the uncached path decides it, from the item's seed. Cached
    prompt embeddings are served under "prompt" (the family collates them).
    """

    def __init__(
        self,
        images: ImageCaptionDataset,
        cache: TensorCache,
        latent_keys,
        text_keys,
        original_sizes: list[tuple[int, int]],
    ):
        self.images, self.cache = images, cache
        self.latent_keys, self.text_keys, self.original_sizes = latent_keys, text_keys, original_sizes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        images = self.images
        if self.latent_keys is None:
            item = images[key]
        else:
            size = images.sizes[index]
            _, crop, flipped = crop_geometry(
                self.original_sizes[index], size, images.center_crop, images.random_flip, random.Random(seed)
            )
            item = {
                **self._entry(self.latent_keys[index][flipped]),
                **conditioning(crop, size),
                **images.caption_inputs(index),
            }
        if self.text_keys is not None:
            item = {k: v for k, v in item.items() if k not in ("caption",) and not k.startswith("input_ids")}
            item["prompt"] = self._entry(self.text_keys[index])
        return item

    def _entry(self, key: str) -> dict[str, torch.Tensor]:
        entry = self.cache.get(key)
        if entry is None:
            raise ModelError(f"feature cache entry {self.cache.path(key)} vanished during the run")
        return entry
