"""Qwen-Image: a 60-block MMDiT conditioned on the last hidden states of Qwen2.5-VL, with a Wan-style video
VAE (latents (B, 16, 1, h, w), normalized per channel) and 2x2-packed latent tokens.

The step is diffusers' train_dreambooth_lora_qwen_image.py: prompts through the pipeline's own template (the
system prompt dropped after encoding, padding masked), uniform noise levels (the scheduler shifts by
resolution only at inference), timestep = sigma, velocity target. Its original module names are the diffusers
ones, so the kohya/ComfyUI file is musubi-tuner's `lora_unet_<path>` layout.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.native import NativeLayout, identity_layout, linear_paths
from .base import Conditioning
from .flow import FlowMatchingFamily


def pad_sequences(entries: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L_max, D) zero-padded and its (B, L_max) mask, from sequences of (L_i, D)."""
    longest = max(e.shape[0] for e in entries)
    embeds = torch.zeros(len(entries), longest, entries[0].shape[-1], dtype=entries[0].dtype)
    mask = torch.zeros(len(entries), longest, dtype=torch.long)
    for i, e in enumerate(entries):
        embeds[i, : e.shape[0]], mask[i, : e.shape[0]] = e, 1
    return embeds, mask


class QwenImage(FlowMatchingFamily):
    name = "qwen-image"
    pipeline_class = "QwenImagePipeline"
    denoiser_class = "QwenImageTransformer2DModel"
    default_guidance = 4.0  # the pipeline's true_cfg_scale

    def vae_scale_factor(self) -> int:
        return 2 ** len(self.parts.vae.temperal_downsample)

    def size_multiple(self) -> tuple[int, str]:
        return 2 * self.vae_scale_factor(), "the VAE's downscale factor times the 2x2 latent patches"

    def encode_prompts(self, batch: dict[str, Any]) -> Conditioning:
        """{"prompt_embeds": (B, L, D), "prompt_embeds_mask": (B, L)}, as QwenImagePipeline encodes."""
        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline(
            scheduler=None,
            vae=None,
            text_encoder=self.parts.text_encoders[0],
            tokenizer=self.parts.tokenizers[0],
            transformer=None,
        )
        embeds, mask = pipe.encode_prompt(
            batch["caption"], device=self.device, max_sequence_length=self.max_sequence_length()
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def split_prompts(self, cond: Conditioning, count: int) -> list[Conditioning]:
        lengths = cond["prompt_embeds_mask"].sum(dim=1).tolist()
        return [{"prompt_embeds": cond["prompt_embeds"][i, : int(n)]} for i, n in enumerate(lengths)]

    def collate_prompts(self, entries: list[Conditioning]) -> Conditioning:
        embeds, mask = pad_sequences([e["prompt_embeds"] for e in entries])
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.parts.vae
        frames = pixels.to(self.device, self.dtype_of(vae)).unsqueeze(2)  # (B, 3, 1, H, W): one frame
        return vae.encode(frames).latent_dist.parameters  # (B, 2z, 1, h, w)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        config, z = self.parts.vae.config, latents.shape[1]
        mean = torch.tensor(config.latents_mean, device=latents.device).view(1, z, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=latents.device).view(1, z, 1, 1, 1)
        return (latents - mean) / std

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        from diffusers import QwenImagePipeline

        transformer = self.parts.denoiser
        dtype = self.dtype_of(transformer)
        b, z, _, h, w = noisy.shape
        packed = QwenImagePipeline._pack_latents(noisy.permute(0, 2, 1, 3, 4), b, z, h, w)  # (B, h/2 * w/2, 4z)
        mask = cond["prompt_embeds_mask"]
        pred = transformer(
            hidden_states=packed.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            timestep=sigmas.to(dtype),
            img_shapes=[(1, h // 2, w // 2)] * b,
            return_dict=False,
        )[0]
        factor = self.vae_scale_factor()
        return QwenImagePipeline._unpack_latents(pred, h * factor, w * factor, factor)  # (B, z, 1, h, w)

    # -- sampling
    def sample(
        self, prompt: str, generator: torch.Generator, width: int, height: int, steps: int, guidance: float | None
    ):
        import diffusers

        parts = self.parts
        pipe = diffusers.QwenImagePipeline(
            scheduler=parts.scheduler, vae=parts.vae, text_encoder=None, tokenizer=None, transformer=parts.denoiser
        )
        pipe.set_progress_bar_config(disable=True)
        cond, negative = (self.collate_prompts([self.sampling_cond[p]]) for p in (prompt, ""))
        return pipe(
            prompt_embeds=cond["prompt_embeds"].to(self.device, self.dtype),
            prompt_embeds_mask=cond["prompt_embeds_mask"].to(self.device),
            negative_prompt_embeds=negative["prompt_embeds"].to(self.device, self.dtype),
            negative_prompt_embeds_mask=negative["prompt_embeds_mask"].to(self.device),
            true_cfg_scale=self.guidance(guidance),
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=generator,
        ).images[0]

    # -- outputs
    @staticmethod
    def native_layout(denoiser: torch.nn.Module) -> NativeLayout:
        return identity_layout(linear_paths(denoiser))

    def kohya_metadata(self) -> dict[str, str]:
        return {
            "ss_network_module": "networks.lora_qwen_image",
            "ss_base_model_version": "qwen_image",
            "modelspec.architecture": "Qwen-Image/lora",
            "modelspec.implementation": "https://github.com/QwenLM/Qwen-Image",
        }
