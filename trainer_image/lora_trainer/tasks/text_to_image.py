"""Stable Diffusion 1.x/2.x LoRA: the diffusers text-to-image recipe, with LoRA on the UNet (and CLIP)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.images import ImageCaptionDataset, collate_images, scan_image_folder
from ..errors import ConfigError, ModelError
from .base import (
    DataReport,
    autocast,
    check_targets_exist,
    load_or_explain,
    lora_param_groups,
    resolve_local_model,
)

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class SDComponents:
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any


def load_tokenizer(cfg: TrainConfig):
    from transformers import CLIPTokenizer

    source = resolve_local_model(cfg)
    if Path(source).is_file():  # a single-file checkpoint keeps its tokenizer in the config folder
        source = cfg.base_model_config or source
    return load_or_explain("the tokenizer", cfg.base_model,
                           lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"))


def load_sd_components(cfg: TrainConfig) -> SDComponents:
    """From a diffusers folder or hub id, or a single-file checkpoint with base_model_config."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_local_model(cfg)
    if Path(source).is_file():
        if not source.endswith(".safetensors"):
            raise ModelError(f"base_model {source}: single-file checkpoints must be .safetensors (never unpickled)")
        if not cfg.base_model_config:
            raise ConfigError("a single-file base_model needs base_model_config: a diffusers folder with its configs")
        pipe = load_or_explain(
            "the single-file pipeline", source,
            lambda: StableDiffusionPipeline.from_single_file(
                source, config=cfg.base_model_config, safety_checker=None, local_files_only=True),
        )
        return SDComponents(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet,
                            DDPMScheduler.from_config(pipe.scheduler.config))
    parts = {
        "tokenizer": (CLIPTokenizer, "tokenizer"),
        "text_encoder": (CLIPTextModel, "text_encoder"),
        "vae": (AutoencoderKL, "vae"),
        "unet": (UNet2DConditionModel, "unet"),
        "noise_scheduler": (DDPMScheduler, "scheduler"),
    }
    loaded = {
        name: load_or_explain(sub, cfg.base_model, lambda cls=cls, sub=sub: cls.from_pretrained(source, subfolder=sub))
        for name, (cls, sub) in parts.items()
    }
    return SDComponents(**loaded)


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
    unet_prefix = "unet"
    text_encoder_prefix = "text_encoder"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.parts: SDComponents | None = None

    # -- data
    def prepare_data(self) -> DataReport:
        cfg = self.cfg
        scan = scan_image_folder(
            cfg.train_data_dir, cfg.metadata_path, cfg.caption_extension, cfg.image_column, cfg.caption_column
        )
        self._records = scan.records
        widths, heights = zip(*scan.sizes)
        summary = {
            "images": len(scan.records),
            "caption_source": scan.caption_source,
            "min_size": f"{min(widths)}x{min(heights)}",
            "max_size": f"{max(widths)}x{max(heights)}",
            "resolution": cfg.resolution,
        }
        self.tokenizer = load_tokenizer(cfg)
        limit = self.tokenizer.model_max_length
        long_captions = sum(1 for r in scan.records if len(self.tokenizer(r.caption).input_ids) > limit)
        warnings = []
        if long_captions:
            warnings.append(f"{long_captions} caption(s) exceed the text encoder's {limit} tokens and are truncated")
        small = sum(1 for w, h in scan.sizes if min(w, h) < cfg.resolution)
        if small:
            warnings.append(f"{small} image(s) are smaller than resolution={cfg.resolution} and will be upscaled")
        return DataReport(summary=summary, warnings=warnings)

    def dataset(self) -> torch.utils.data.Dataset:
        cfg = self.cfg
        return ImageCaptionDataset(self._records, cfg.resolution, cfg.center_crop, cfg.random_flip, self.tokenize)

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate_images(items)

    def tokenize(self, caption: str) -> torch.Tensor:
        tokenizer = self.tokenizer
        ids = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids
        return ids[0]  # (L,)

    # -- model
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        cfg = self.cfg
        parts = load_sd_components(cfg)
        for module in (parts.vae, parts.text_encoder, parts.unet):
            module.requires_grad_(False)
        check_targets_exist(parts.unet, cfg.target_modules, "UNet")
        parts.unet.add_adapter(self._lora_config(cfg.target_modules))
        if cfg.train_text_encoder:
            parts.text_encoder.add_adapter(self._lora_config(TEXT_ENCODER_TARGETS))
        for module in (parts.vae, parts.text_encoder, parts.unet):
            module.to(device)
            if weight_dtype != torch.float32:  # frozen weights in half precision on GPU
                module.to(dtype=weight_dtype)
        for module in self._lora_modules(parts):  # LoRA weights train in fp32 whatever the base dtype
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if cfg.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                parts.text_encoder.gradient_checkpointing_enable()
        self.parts, self.device = parts, device
        self.prediction_type = cfg.prediction_type or parts.noise_scheduler.config.prediction_type
        if cfg.prediction_type:
            parts.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)

    def _lora_config(self, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.network_alpha, lora_dropout=self.cfg.lora_dropout,
                          init_lora_weights="gaussian", target_modules=list(targets))

    def _lora_modules(self, parts: SDComponents) -> list[torch.nn.Module]:
        return [parts.unet, parts.text_encoder] if self.cfg.train_text_encoder else [parts.unet]

    def param_groups(self) -> list[dict[str, Any]]:
        pairs = [(self.parts.unet, self.cfg.learning_rate)]
        if self.cfg.train_text_encoder:
            pairs.append((self.parts.text_encoder, self.cfg.text_encoder_lr))
        return lora_param_groups(pairs)

    def train_mode(self) -> None:
        self.parts.unet.train()
        self.parts.text_encoder.train(self.cfg.train_text_encoder)
        self.parts.vae.eval()

    # -- one micro-batch
    def loss(self, batch: dict[str, torch.Tensor], rng: torch.Generator) -> torch.Tensor:
        parts, cfg, device = self.parts, self.cfg, self.device
        pixels = batch["pixel_values"].to(device, dtype=parts.vae.dtype)  # (B, 3, H, W)
        with torch.no_grad():
            latents = parts.vae.encode(pixels).latent_dist.sample(generator=rng)
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
                text = parts.text_encoder(batch["input_ids"].to(device), return_dict=False)[0]  # (B, L, D)
            pred = parts.unet(noisy.to(parts.unet.dtype), timesteps, text, return_dict=False)[0]
        return diffusion_loss(pred, target, timesteps, parts.noise_scheduler, self.prediction_type, cfg.snr_gamma)

    def batch_counts(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        return batch["pixel_values"].shape[0], 0

    # -- weights
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys as diffusers' own training scripts write them: unet.*.lora.down/up.weight for the UNet,
        text_encoder.*.lora_linear_layer.down/up.weight for CLIP."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        out = {}
        for prefix, module in self._prefixed_modules():
            state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module, save_embedding_layers=False))
            out.update({f"{prefix}.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()})
        return out

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        to_peft = {self.unet_prefix: convert_unet_state_dict_to_peft,
                   self.text_encoder_prefix: convert_state_dict_to_peft}
        for prefix, module in self._prefixed_modules():
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if not part:
                raise ModelError(f"checkpoint has no {prefix} LoRA weights")
            result = set_peft_model_state_dict(module, to_peft[prefix](part))
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ModelError(f"checkpoint does not match the {prefix} LoRA (unexpected: {unexpected[:3]})")

    def _prefixed_modules(self) -> list[tuple[str, torch.nn.Module]]:
        out = [(self.unet_prefix, self.parts.unet)]
        if self.cfg.train_text_encoder:
            out.append((self.text_encoder_prefix, self.parts.text_encoder))
        return out

    def weights_metadata(self) -> dict[str, str]:
        cfg = self.cfg
        adapter = diffusers_lora_metadata(self.unet_prefix, cfg.lora_rank, cfg.network_alpha, cfg.target_modules)
        if cfg.train_text_encoder:
            adapter.update(diffusers_lora_metadata(
                self.text_encoder_prefix, cfg.lora_rank, cfg.network_alpha, TEXT_ENCODER_TARGETS))
        return {"lora_adapter_metadata": json.dumps(adapter, sort_keys=True)}

    def write_sidecars(self, folder: Path) -> list[Path]:
        return []
