"""Stable Diffusion 1.x/2.x and SDXL: the diffusers text-to-image recipes (epsilon or v-prediction on a UNet),
with LoRA on the UNet and optionally on the CLIP text encoder(s).

The two differ only in how a caption becomes conditioning: SD uses one CLIP encoder's last hidden state;
SDXL concatenates the penultimate hidden states of two encoders and adds the second's pooled embedding and
"time ids" (original size, crop corner, target size) as micro-conditioning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..base_model import load_or_explain
from ..distributed import BatchRandom, to_device_except
from ..errors import ConfigError, ModelError
from ..quantization import keep_quantized_for_backward, load_kwargs
from .base import Components, Conditioning, ModelFamily, vae_scale_factor

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_PREFIX = "unet"
MICRO_CONDITIONING = ("original_size", "crop_top_left", "target_size")  # SDXL's time ids, each (B, 2)


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    prediction_type: str,
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


def lora_config(cfg, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.network_alpha,
        lora_dropout=cfg.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_prefix = UNET_PREFIX
    denoiser_class = "UNet2DConditionModel"
    block_attributes = ("down_blocks", "mid_block", "up_blocks")  # the UNet's resolution levels
    caches_prompts = False  # CLIP is small, and trainable with train_text_encoder
    releases_text_encoders = False  # validation samples from the prompt text
    checkpoints_gradients = False
    text_encoder_lora = True

    def check_config(self) -> None:
        super().check_config()
        mode = self.cfg.base_quantization
        if mode != "none" and Path(self.source).is_file():
            raise ConfigError(
                f"base_quantization: {mode} quantizes the UNet as it loads from a diffusers folder, and a single-file "
                f"{self.name} checkpoint loads as a whole pipeline: save it as a folder first "
                f"({self.pipeline_class}.from_single_file(path).save_pretrained(folder)) or use base_quantization: none"
            )

    # -- loading
    def load_tokenizers(self) -> list[Any]:
        from transformers import CLIPTokenizer

        source = self.config_source
        self.parts.tokenizers = [
            load_or_explain(
                sub, self.cfg.base_model, lambda sub=sub: CLIPTokenizer.from_pretrained(source, subfolder=sub)
            )
            for sub in self.tokenizer_subfolders
        ]
        return self.parts.tokenizers

    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> None:
        if Path(self.source).is_file():
            self._load_single_file()
        else:
            super().load_text_encoders(device, torch.float32)
        self.device, self.dtype = device, dtype

    def load_denoiser_and_vae(self, device: torch.device, dtype: torch.dtype, blocks_on_host: bool = False) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        self.device, self.dtype = device, dtype
        parts = self.parts
        if parts.denoiser is None:  # a folder: a single file came with everything in load_text_encoders

            def part(cls, sub, **kwargs):
                return load_or_explain(
                    sub, self.cfg.base_model, lambda: cls.from_pretrained(self.config_source, subfolder=sub, **kwargs)
                )

            quantized = load_kwargs(self.cfg.base_quantization, "diffusers", dtype, self.cfg.distributed_strategy)
            unet_kwargs = {"torch_dtype": dtype, **quantized} if quantized else {}  # quantized as it loads
            parts.vae, parts.denoiser = part(AutoencoderKL, "vae"), part(UNet2DConditionModel, "unet", **unet_kwargs)
            keep_quantized_for_backward(parts.denoiser)
            parts.scheduler = part(DDPMScheduler, "scheduler")
        for module in (parts.vae, parts.denoiser, *parts.text_encoders):
            module.requires_grad_(False)
            on_host = self.denoiser_blocks() if blocks_on_host and module is parts.denoiser else ()
            to_device_except(module, device, on_host)
            if dtype != torch.float32 and getattr(module, "hf_quantizer", None) is None:  # half precision on GPU
                module.to(dtype=dtype)
        parts.vae.eval()
        cfg = self.cfg
        self.prediction_type = cfg.prediction_type or parts.scheduler.config.prediction_type
        if cfg.prediction_type:
            parts.scheduler.register_to_config(prediction_type=cfg.prediction_type)

    def _load_single_file(self) -> None:
        import diffusers
        from diffusers import DDPMScheduler

        pipeline_class = getattr(diffusers, self.pipeline_class)
        pipe = load_or_explain(
            "the single-file pipeline",
            self.source,
            lambda: pipeline_class.from_single_file(self.source, config=self.config_source, local_files_only=True),
        )
        self.parts = Components(
            self.parts.tokenizers,
            [getattr(pipe, p) for p in self.text_encoder_subfolders],
            pipe.unet,
            pipe.vae,
            DDPMScheduler.from_config(pipe.scheduler.config),
        )

    def size_multiple(self) -> tuple[int, str]:
        return vae_scale_factor(self.parts.vae), "the VAE's downscale factor"

    # -- LoRA
    def add_lora(self) -> None:
        from ..adapters import check_targets_exist

        cfg, parts = self.cfg, self.parts
        check_targets_exist(parts.denoiser, self.targets, "UNet", rank=cfg.lora_rank)
        parts.denoiser.add_adapter(lora_config(cfg, self.targets))
        if cfg.train_text_encoder:
            for encoder in parts.text_encoders:
                encoder.add_adapter(lora_config(cfg, TEXT_ENCODER_TARGETS))
        for _, module in self.trainable_modules():  # LoRA weights train in fp32 whatever the base dtype
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if self.gradient_checkpointing:
            parts.denoiser.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for encoder in parts.text_encoders:
                    encoder.gradient_checkpointing_enable()

    def trainable_modules(self) -> list[tuple[str, torch.nn.Module]]:
        out = [(UNET_PREFIX, self.parts.denoiser)]
        if self.cfg.train_text_encoder:
            out += list(zip(self.text_encoder_subfolders, self.parts.text_encoders))
        return out

    def param_groups(self) -> list[tuple[torch.nn.Module, float]]:
        groups = [(self.parts.denoiser, self.cfg.learning_rate)]
        if self.cfg.train_text_encoder:
            groups += [(encoder, self.cfg.text_encoder_lr) for encoder in self.parts.text_encoders]
        return groups

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys as diffusers' own training scripts write them: unet.*.lora.down/up.weight for the UNet,
        text_encoder[_2].*.lora_linear_layer.down/up.weight for CLIP."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        from ..formats.lora import uniform_diffusers_keys, with_clip_root

        out = {}
        for prefix, module in self.trainable_modules():
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

        for prefix, module in self.trainable_modules():
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if not part:
                raise ModelError(f"checkpoint has no {prefix} LoRA weights")
            to_peft = convert_unet_state_dict_to_peft if prefix == UNET_PREFIX else convert_state_dict_to_peft
            result = set_peft_model_state_dict(module, to_peft(for_module(part, module)))
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ModelError(f"checkpoint does not match the {prefix} LoRA (unexpected: {unexpected[:3]})")

    def adapter_metadata(self) -> dict[str, Any]:
        from ..formats.lora import diffusers_lora_metadata

        cfg = self.cfg
        adapter = diffusers_lora_metadata(UNET_PREFIX, cfg.lora_rank, cfg.network_alpha, self.targets)
        for prefix, _ in self.trainable_modules()[1:]:
            adapter.update(diffusers_lora_metadata(prefix, cfg.lora_rank, cfg.network_alpha, TEXT_ENCODER_TARGETS))
        return adapter

    def train_mode(self) -> None:
        self.parts.denoiser.train()
        for encoder in self.parts.text_encoders:
            encoder.train(self.cfg.train_text_encoder)

    # -- conditioning
    def token_inputs(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """The token ids of each caption ({"input_ids": (L,), ...}), each distinct caption tokenized once."""
        distinct = list(dict.fromkeys(captions))
        tables = self.token_tables(distinct)
        row = {caption: j for j, caption in enumerate(distinct)}
        return [{key: table[row[caption]] for key, table in tables.items()} for caption in captions]

    def token_tables(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """{"input_ids": (N, L), and "input_ids_2" for SDXL}: the captions tokenized in one call per tokenizer."""
        return {
            "input_ids" if i == 0 else f"input_ids_{i + 1}": tokenizer(
                captions,
                max_length=tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for i, tokenizer in enumerate(self.parts.tokenizers)
        }

    def prompt_batch(self, captions: list[str]) -> dict[str, Any]:
        return self.token_tables(captions)

    def encode_prompts(self, batch: dict[str, Any]) -> Conditioning:
        """{"prompt_embeds": (B, L, D)}: the last hidden state of CLIP."""
        ids = batch["input_ids"].to(self.device)
        return {"prompt_embeds": self.parts.text_encoders[0](ids, return_dict=False)[0]}

    def caption_limit(self) -> tuple[Any, int]:
        tokenizer = self.parts.tokenizers[0]
        return tokenizer, tokenizer.model_max_length

    # -- latents and loss
    def latents(self, params: torch.Tensor, draws: BatchRandom) -> torch.Tensor:
        return super().latents(params, draws) * self.parts.vae.config.scaling_factor  # (B, 4, h, w)

    def denoiser_inputs(self, cond: Conditioning, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """(cross-attention states, added conditioning) for the UNet."""
        return cond["prompt_embeds"].to(self.device), {}

    def loss(
        self, latents: torch.Tensor, cond: Conditioning, batch: dict[str, Any], draws: BatchRandom
    ) -> torch.Tensor:
        from ..adapters import autocast

        cfg, device, scheduler, unet = self.cfg, self.device, self.parts.scheduler, self.parts.denoiser
        noise = draws.randn(tuple(latents.shape[1:])).to(device)
        if cfg.noise_offset:
            noise += cfg.noise_offset * draws.randn((latents.shape[1], 1, 1)).to(device)
        timesteps = draws.randint(0, scheduler.config.num_train_timesteps).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps) if self.prediction_type == "v_prediction" else noise
        with autocast(device, cfg.mixed_precision):
            text, added = self.denoiser_inputs(cond, batch)
            pred = unet(
                noisy.to(self.dtype_of(unet)), timesteps, text, added_cond_kwargs=added or None, return_dict=False
            )[0]
        return diffusion_loss(pred, target, timesteps, scheduler, self.prediction_type, cfg.snr_gamma)

    # -- sampling
    def pipeline(self):
        """The family's pipeline around the models being trained, with the base model's own scheduler."""
        if self._pipeline is None:
            import diffusers

            index = self.model_index()
            scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(
                self.config_source, subfolder="scheduler"
            )
            if self.cfg.prediction_type:
                scheduler.register_to_config(prediction_type=self.cfg.prediction_type)
            parts = self.parts
            encoders = parts.text_encoders or [None] * len(self.text_encoder_subfolders)
            kwargs = {
                "vae": parts.vae,
                "unet": parts.denoiser,
                "scheduler": scheduler,
                **dict(zip(self.text_encoder_subfolders, encoders)),
                **dict(zip(self.tokenizer_subfolders, parts.tokenizers)),
            }
            kwargs.update(self.pipeline_extras())
            self._pipeline = getattr(diffusers, self.pipeline_class)(**kwargs)
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    def pipeline_extras(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def sample(self, prompt: str, generator: torch.Generator, width: int, height: int, steps: int, guidance: float):
        return self.pipeline()(
            prompt,
            num_inference_steps=steps,
            guidance_scale=self.guidance(guidance),
            height=height,
            width=width,
            generator=generator,
        ).images[0]

    # -- outputs
    def extra_files(self, out: Path, weights: dict[str, torch.Tensor], meta: dict[str, str]) -> list[tuple[Path, str]]:
        from ..formats import write_kohya_file

        return write_kohya_file(self.cfg, out, weights, meta, self.kohya_unet_config())

    def kohya_unet_config(self) -> dict[str, Any] | None:
        return None  # kohya's SD 1.x/2.x files use the diffusers UNet names


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_subfolders = ("text_encoder", "text_encoder_2")
    tokenizer_subfolders = ("tokenizer", "tokenizer_2")

    def encode_prompts(self, batch: dict[str, Any]) -> Conditioning:
        """{"prompt_embeds": (B, L, D1 + D2) penultimate states, "pooled_prompt_embeds": (B, D2)}."""
        hidden, pooled = [], None
        for i, encoder in enumerate(self.parts.text_encoders):
            ids = batch["input_ids" if i == 0 else f"input_ids_{i + 1}"].to(self.device)
            out = encoder(ids, output_hidden_states=True, return_dict=False)
            pooled = out[0]  # the last encoder's projected pooled output
            hidden.append(out[-1][-2])  # penultimate layer: (B, L, Di)
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def denoiser_inputs(self, cond: Conditioning, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        hidden, pooled = cond["prompt_embeds"].to(self.device), cond["pooled_prompt_embeds"].to(self.device)
        time_ids = torch.cat([batch[k].to(self.device) for k in MICRO_CONDITIONING], dim=1)  # (B, 6)
        return hidden, {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}

    def pipeline_extras(self) -> dict[str, Any]:
        return {}

    def kohya_unet_config(self) -> dict[str, Any] | None:
        return dict(self.parts.denoiser.config)  # kohya's SDXL files name UNet modules in LDM spelling
