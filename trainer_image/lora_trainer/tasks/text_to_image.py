"""Stable Diffusion LoRA (1.x/2.x and SDXL): the diffusers text-to-image recipes, with LoRA on the UNet
and optionally on the text encoder(s).

The two families differ only in how a caption becomes conditioning: SD uses one CLIP encoder's last
hidden state; SDXL concatenates the penultimate hidden states of two encoders and adds the second's
pooled embedding and "time ids" (original size, crop corner, target size) as micro-conditioning.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..compat import PeftThrough
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
from ..errors import ConfigError, ModelError
from ..labeling.auto import scan_captioned_folder
from ..observers import ValidationResult
from ..presets import cache_root
from .base import DataReport, autocast, check_targets_exist, load_or_explain, lora_param_groups, resolve_local_model

log = logging.getLogger("lora_trainer")

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_PREFIX = "unet"


@dataclass(frozen=True)
class Family:
    """What differs between SD 1.x/2.x and SDXL pipelines on disk and in the forward pass."""

    name: str
    pipeline_class: str
    text_encoder_classes: tuple[str, ...]
    text_encoder_prefixes: tuple[str, ...]  # also their subfolders, and the LoRA key prefixes
    tokenizer_subfolders: tuple[str, ...]


SD = Family("sd", "StableDiffusionPipeline", ("CLIPTextModel",), ("text_encoder",), ("tokenizer",))
SDXL = Family("sdxl", "StableDiffusionXLPipeline", ("CLIPTextModel", "CLIPTextModelWithProjection"),
              ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"))


@dataclass
class SDComponents:
    tokenizers: list[Any]
    text_encoders: list[torch.nn.Module]
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any


def config_source(cfg: TrainConfig) -> str:
    """Where the pipeline's configs live: the model folder, or base_model_config for a single file."""
    source = resolve_local_model(cfg)
    if Path(source).is_file():
        if not source.endswith(".safetensors"):
            raise ModelError(f"base_model {source}: single-file checkpoints must be .safetensors (never unpickled)")
        if not cfg.base_model_config:
            raise ConfigError("a single-file base_model needs base_model_config: a diffusers folder with its configs")
        return cfg.base_model_config
    return source


def detect_family(cfg: TrainConfig) -> Family:
    from diffusers import DiffusionPipeline

    source = config_source(cfg)
    index = load_or_explain("model_index.json", cfg.base_model, lambda: DiffusionPipeline.load_config(source))
    name = index.get("_class_name", "")
    if "XL" in name:
        return SDXL
    if name.startswith("StableDiffusion"):
        return SD
    raise ModelError(f"base_model {cfg.base_model} is a {name or 'unknown pipeline'}; text-to-image trains "
                     "Stable Diffusion 1.x/2.x and SDXL pipelines")


def load_tokenizers(cfg: TrainConfig, family: Family) -> list[Any]:
    from transformers import CLIPTokenizer

    source = config_source(cfg)
    return [load_or_explain(sub, cfg.base_model, lambda sub=sub: CLIPTokenizer.from_pretrained(source, subfolder=sub))
            for sub in family.tokenizer_subfolders]


def load_components(cfg: TrainConfig, family: Family, tokenizers: list[Any]) -> SDComponents:
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    source = resolve_local_model(cfg)
    if Path(source).is_file():
        pipeline_class = getattr(diffusers, family.pipeline_class)
        pipe = load_or_explain(
            "the single-file pipeline", source,
            lambda: pipeline_class.from_single_file(source, config=cfg.base_model_config, local_files_only=True),
        )
        encoders = [getattr(pipe, prefix) for prefix in family.text_encoder_prefixes]
        return SDComponents(tokenizers, encoders, pipe.vae, pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config))

    def part(cls, sub):
        return load_or_explain(sub, cfg.base_model, lambda: cls.from_pretrained(source, subfolder=sub))

    encoders = [part(getattr(transformers, cls), sub)
                for cls, sub in zip(family.text_encoder_classes, family.text_encoder_prefixes)]
    return SDComponents(tokenizers, encoders, part(AutoencoderKL, "vae"), part(UNet2DConditionModel, "unet"),
                        part(DDPMScheduler, "scheduler"))


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler, prediction_type: str,
    snr_gamma: float | None,
) -> torch.Tensor:
    """MSE, optionally Min-SNR weighted (Hang et al. 2023) as in the diffusers examples."""
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)  # (B,)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    return (per_sample * weights).mean()


def diffusers_lora_metadata(prefix: str, rank: int, alpha: float, targets: list[str]) -> dict[str, Any]:
    """LoraConfig kwargs under `prefix.`, as diffusers' load_lora_weights reads them back."""
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "lora_dropout": 0.0}
    return {f"{prefix}.{k}": v for k, v in config.items()}


class TextToImageTask:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.parts: SDComponents | None = None
        self._pipeline = None

    @staticmethod
    def library_needs(cfg: TrainConfig) -> list[PeftThrough]:
        needs = [PeftThrough("task_type: text-to-image", "diffusers", "diffusers.utils.constants:MIN_PEFT_VERSION")]
        if cfg.train_text_encoder:
            needs.append(PeftThrough("train_text_encoder: true", "transformers",
                                     "transformers.integrations.peft:MIN_PEFT_VERSION"))
        return needs

    # -- data
    def prepare_data(self, labeling=None) -> DataReport:
        cfg = self.cfg
        scan = scan_captioned_folder(cfg, progress=labeling)  # with auto_label, captions what has none first
        self.records, self.original_sizes = scan.records, scan.sizes
        self.family = detect_family(cfg)
        self.tokenizers = load_tokenizers(cfg, self.family)
        self.sizes = self.target_sizes(scan.sizes)
        widths, heights = zip(*scan.sizes)
        summary = {
            "images": len(scan.records),
            "caption_source": scan.caption_source,
            "min_size": f"{min(widths)}x{min(heights)}",
            "max_size": f"{max(widths)}x{max(heights)}",
            "resolution": cfg.resolution,
            "model_family": self.family.name,
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
        limit = self.tokenizers[0].model_max_length
        long_captions = sum(1 for r in self.records if len(self.tokenizers[0](r.caption).input_ids) > limit)
        if long_captions:
            warnings.append(f"{long_captions} caption(s) exceed the text encoder's {limit} tokens and are truncated")
        small = sum(1 for (w, h), (tw, th) in zip(sizes, self.sizes) if w < tw or h < th)
        if small:
            warnings.append(f"{small} image(s) are smaller than their training size and will be upscaled")
        return warnings

    def dataset(self) -> torch.utils.data.Dataset:
        cfg = self.cfg
        tokens = self.tokenize_all([r.caption for r in self.records])
        images = ImageCaptionDataset(self.records, self.sizes, cfg.center_crop, cfg.random_flip, tokens)
        if not (cfg.cache_latents or cfg.cache_text_encoder_outputs):
            return images
        cache = TensorCache(cfg.cache_dir or cache_root() / "features")
        latents = self.fill_latent_cache(cache) if cfg.cache_latents else None
        texts = self.fill_text_cache(cache) if cfg.cache_text_encoder_outputs else None
        return CachedFeatureDataset(images, cache, latents, texts, self.original_sizes)

    # -- feature caches
    def fill_latent_cache(self, cache: TensorCache) -> list[tuple[str, str]]:
        """(plain, flipped) cache keys per record; encodes whatever is missing, a bucket at a time."""
        fingerprint = module_fingerprint(self.parts.vae)
        hashes = image_hashes([r.path for r in self.records])
        keys = [tuple(key_of("latent", h, size, flipped, fingerprint) for flipped in (False, True))
                for h, size in zip(hashes, self.sizes)]
        todo = [(i, flipped) for i, pair in enumerate(keys) for flipped in (False, True)
                if (self.cfg.random_flip or not flipped) and not cache.intact(pair[flipped])]
        log.info("latent cache: %d of %d entries to compute", len(todo), len(keys) * (2 if self.cfg.random_flip else 1))
        vae = self.parts.vae
        for size in dict.fromkeys(self.sizes):
            group = [(i, f) for i, f in todo if self.sizes[i] == size]
            for start in range(0, len(group), 8):
                chunk = group[start : start + 8]
                pixels = torch.stack([self.fixed_pixels(i, f) for i, f in chunk]).to(self.device, vae.dtype)
                with torch.no_grad():
                    params = vae.encode(pixels).latent_dist.parameters  # (B, 2C, h, w): mean and logvar
                for (i, f), p in zip(chunk, params):
                    cache.put(keys[i][f], {"latent_dist": p})
        return keys

    def fixed_pixels(self, index: int, flipped: bool) -> torch.Tensor:
        """The pixels of a record with the centre crop (caching requires it), flipped or not."""
        image = load_image(self.records[index].path)
        image, _ = resize_and_crop(image, self.sizes[index], True, flipped, ALWAYS_FLIP)
        return to_tensor(image)

    def fill_text_cache(self, cache: TensorCache) -> list[str]:
        fingerprints = [module_fingerprint(e) for e in self.parts.text_encoders]
        captions = [r.caption for r in self.records]
        keys = [key_of("text", self.family.name, c, fingerprints) for c in captions]
        todo = [c for c, k in dict(zip(captions, keys)).items() if not cache.intact(k)]
        log.info("text-encoder cache: %d of %d captions to encode", len(todo), len(set(captions)))
        for start in range(0, len(todo), 16):
            chunk = todo[start : start + 16]
            ids = self.token_tables(chunk)  # the captions of todo are distinct
            with torch.no_grad():
                hidden, pooled = self.encode_text(ids)
            for j, caption in enumerate(chunk):
                entry = {"prompt_embeds": hidden[j]}
                if pooled is not None:
                    entry["pooled_prompt_embeds"] = pooled[j]
                cache.put(keys[captions.index(caption)], entry)
        return keys

    def item_groups(self) -> tuple[tuple[int, ...], ...]:
        return group_by(self.sizes)

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate_images(items)

    def token_tables(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """{"input_ids": (N, L), and "input_ids_2" for SDXL}: the captions tokenized in one call per tokenizer."""
        return {"input_ids" if i == 0 else f"input_ids_{i + 1}": tokenizer(
                    captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
                for i, tokenizer in enumerate(self.tokenizers)}

    def tokenize_all(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """The token ids of each caption ({"input_ids": (L,), ...}), each distinct caption tokenized once."""
        distinct = list(dict.fromkeys(captions))
        tables = self.token_tables(distinct)
        row = {caption: j for j, caption in enumerate(distinct)}
        return [{key: table[row[caption]] for key, table in tables.items()} for caption in captions]

    # -- model
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        cfg = self.cfg
        parts = load_components(cfg, self.family, self.tokenizers)
        self.check_sizes(parts.vae)
        for module in (parts.vae, parts.unet, *parts.text_encoders):
            module.requires_grad_(False)
        check_targets_exist(parts.unet, cfg.target_modules, "UNet")
        parts.unet.add_adapter(self._lora_config(cfg.target_modules))
        if cfg.train_text_encoder:
            for encoder in parts.text_encoders:
                encoder.add_adapter(self._lora_config(TEXT_ENCODER_TARGETS))
        for module in (parts.vae, parts.unet, *parts.text_encoders):
            module.to(device)
            if weight_dtype != torch.float32:  # frozen weights in half precision on GPU
                module.to(dtype=weight_dtype)
        for _, module in self._prefixed_modules(parts):  # LoRA weights train in fp32 whatever the base dtype
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if cfg.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for encoder in parts.text_encoders:
                    encoder.gradient_checkpointing_enable()
        self.parts, self.device = parts, device
        self.prediction_type = cfg.prediction_type or parts.noise_scheduler.config.prediction_type
        if cfg.prediction_type:
            parts.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)

    def check_sizes(self, vae) -> None:
        factor = vae_scale_factor(vae)
        bad = sorted({f"{w}x{h}" for w, h in self.sizes if w % factor or h % factor})
        if bad:
            key = "bucket_reso_steps" if self.cfg.enable_bucket else "resolution"
            raise ConfigError(f"training sizes {', '.join(bad)} are not multiples of {factor}, the VAE's downscale "
                              f"factor: change {key}")

    def _lora_config(self, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.network_alpha, lora_dropout=self.cfg.lora_dropout,
                          init_lora_weights="gaussian", target_modules=list(targets))

    def _prefixed_modules(self, parts: SDComponents | None = None) -> list[tuple[str, torch.nn.Module]]:
        parts = parts or self.parts
        out = [(UNET_PREFIX, parts.unet)]
        if self.cfg.train_text_encoder:
            out += list(zip(self.family.text_encoder_prefixes, parts.text_encoders))
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        pairs = [(self.parts.unet, self.cfg.learning_rate)]
        if self.cfg.train_text_encoder:
            pairs += [(encoder, self.cfg.text_encoder_lr) for encoder in self.parts.text_encoders]
        return lora_param_groups(pairs)

    def train_mode(self) -> None:
        self.parts.unet.train()
        for encoder in self.parts.text_encoders:
            encoder.train(self.cfg.train_text_encoder)
        self.parts.vae.eval()

    # -- one micro-batch
    def encode_text(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, D) hidden states for cross-attention and, for SDXL, the (B, D2) pooled embedding."""
        encoders, device = self.parts.text_encoders, self.device
        if self.family is SD:
            return encoders[0](batch["input_ids"].to(device), return_dict=False)[0], None
        hidden, pooled = [], None
        for i, encoder in enumerate(encoders):
            ids = batch["input_ids" if i == 0 else f"input_ids_{i + 1}"].to(device)
            out = encoder(ids, output_hidden_states=True, return_dict=False)
            pooled = out[0]  # the last encoder's projected pooled output
            hidden.append(out[-1][-2])  # penultimate layer: (B, L, Di)
        return torch.cat(hidden, dim=-1), pooled

    def encode_prompt(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Cross-attention states and SDXL's added conditioning, from the cache when it has them."""
        device = self.device
        if "prompt_embeds" in batch:
            hidden, pooled = batch["prompt_embeds"].to(device), batch.get("pooled_prompt_embeds")
            pooled = pooled.to(device) if pooled is not None else None
        else:
            hidden, pooled = self.encode_text(batch)
        if self.family is SD:
            return hidden, {}
        parts = ("original_size", "crop_top_left", "target_size")
        time_ids = torch.cat([batch[k].to(device) for k in parts], dim=1)  # (B, 6)
        return hidden, {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}

    def loss(self, batch: dict[str, torch.Tensor], rng: torch.Generator) -> torch.Tensor:
        parts, cfg, device = self.parts, self.cfg, self.device
        with torch.no_grad():
            latents = self.latent_distribution(batch).sample(generator=rng)
            latents = latents.float() * parts.vae.config.scaling_factor  # (B, 4, h, w)
        noise = torch.randn(latents.shape, generator=rng, device=device)
        if cfg.noise_offset:
            noise += cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=rng, device=device)
        timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=rng, device=device)
        noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = parts.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with autocast(device, cfg.mixed_precision):
            with torch.set_grad_enabled(cfg.train_text_encoder):
                text, added = self.encode_prompt(batch)
            pred = parts.unet(noisy.to(parts.unet.dtype), timesteps, text,
                              added_cond_kwargs=added or None, return_dict=False)[0]
        return diffusion_loss(pred, target, timesteps, parts.noise_scheduler, self.prediction_type, cfg.snr_gamma)

    def latent_distribution(self, batch: dict[str, torch.Tensor]):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if "latent_dist" in batch:  # cached parameters: the same distribution, without the VAE
            return DiagonalGaussianDistribution(batch["latent_dist"].to(self.device))
        pixels = batch["pixel_values"].to(self.device, dtype=self.parts.vae.dtype)  # (B, 3, H, W)
        return self.parts.vae.encode(pixels).latent_dist

    def batch_counts(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        return batch["original_size"].shape[0], 0

    # -- validation
    def validate(self, step: int) -> ValidationResult | None:
        cfg = self.cfg
        if not cfg.validation_prompts:
            return None
        pipe = self.inference_pipeline()
        self.parts.unet.eval()
        for encoder in self.parts.text_encoders:
            encoder.eval()
        images = []
        for i, prompt in enumerate(cfg.validation_prompts):
            generator = torch.Generator(self.device).manual_seed(cfg.validation_seed + i)
            with torch.no_grad(), autocast(self.device, cfg.mixed_precision):
                image = pipe(prompt, num_inference_steps=cfg.validation_inference_steps,
                             guidance_scale=cfg.validation_guidance_scale, height=cfg.resolution,
                             width=cfg.resolution, generator=generator).images[0]
            images.append((prompt, image))
        return ValidationResult(step, images=images)

    def inference_pipeline(self):
        """The family's pipeline around the models being trained, with the base model's own scheduler."""
        if self._pipeline is None:
            import diffusers

            source = config_source(self.cfg)
            index = diffusers.DiffusionPipeline.load_config(source)
            scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(source, subfolder="scheduler")
            if self.cfg.prediction_type:
                scheduler.register_to_config(prediction_type=self.cfg.prediction_type)
            family, parts = self.family, self.parts
            kwargs = {"vae": parts.vae, "unet": parts.unet, "scheduler": scheduler,
                      **dict(zip(family.text_encoder_prefixes, parts.text_encoders)),
                      **dict(zip(family.tokenizer_subfolders, self.tokenizers))}
            if family is SD:
                kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            self._pipeline = getattr(diffusers, family.pipeline_class)(**kwargs)
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    # -- weights
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys as diffusers' own training scripts write them: unet.*.lora.down/up.weight for the UNet,
        text_encoder[_2].*.lora_linear_layer.down/up.weight for CLIP."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        from ..formats.lora import uniform_diffusers_keys, with_clip_root

        out = {}
        for prefix, module in self._prefixed_modules():
            state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module, save_embedding_layers=False))
            state = uniform_diffusers_keys(state, prefix)  # conv/ff keys too, else diffusers drops some
            if prefix != UNET_PREFIX:
                state = with_clip_root(state)
            out.update({f"{prefix}.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()})
        return out

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        from ..formats.lora import for_module

        for prefix, module in self._prefixed_modules():
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if not part:
                raise ModelError(f"checkpoint has no {prefix} LoRA weights")
            to_peft = convert_unet_state_dict_to_peft if prefix == UNET_PREFIX else convert_state_dict_to_peft
            result = set_peft_model_state_dict(module, to_peft(for_module(part, module)))
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ModelError(f"checkpoint does not match the {prefix} LoRA (unexpected: {unexpected[:3]})")

    def weights_metadata(self) -> dict[str, str]:
        cfg = self.cfg
        adapter = diffusers_lora_metadata(UNET_PREFIX, cfg.lora_rank, cfg.network_alpha, cfg.target_modules)
        for prefix, _ in self._prefixed_modules()[1:]:
            adapter.update(diffusers_lora_metadata(prefix, cfg.lora_rank, cfg.network_alpha, TEXT_ENCODER_TARGETS))
        return {"lora_adapter_metadata": json.dumps(adapter, sort_keys=True), "model_family": self.family.name}

    def write_sidecars(self, folder: Path) -> list[Path]:
        return []


class _AlwaysFlip(random.Random):
    """An rng whose coin always says "flip": with a centre crop it is crop_geometry's only draw."""

    def random(self) -> float:
        return 0.0


ALWAYS_FLIP = _AlwaysFlip()


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Serves cached latents and/or text-encoder outputs in place of pixels and token ids.

    The flip of an item is decided exactly as the uncached path decides it, from the item's seed.
    """

    def __init__(self, images: ImageCaptionDataset, cache: TensorCache, latent_keys, text_keys,
                 original_sizes: list[tuple[int, int]]):
        self.images, self.cache = images, cache
        self.latent_keys, self.text_keys, self.original_sizes = latent_keys, text_keys, original_sizes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        images = self.images
        if self.latent_keys is None:
            item = images[key]
        else:
            size = images.sizes[index]
            _, crop, flipped = crop_geometry(self.original_sizes[index], size, images.center_crop,
                                             images.random_flip, random.Random(seed))
            item = {**self._entry(self.latent_keys[index][flipped]), **conditioning(crop, size),
                    **images.tokens[index]}
        if self.text_keys is not None:
            item = {k: v for k, v in item.items() if not k.startswith("input_ids")}
            item.update(self._entry(self.text_keys[index]))
        return item

    def _entry(self, key: str) -> dict[str, torch.Tensor]:
        entry = self.cache.get(key)
        if entry is None:
            raise ModelError(f"feature cache entry {self.cache.path(key)} vanished during the run")
        return entry

