"""FLUX.1 (dev, schnell): a rectified-flow transformer with CLIP-L (pooled) and T5 (sequence) text encoders,
2x2-packed 16-channel latents, and for dev a guidance input (guidance distillation).

The step is diffusers' train_dreambooth_lora_flux.py: latents (z - shift) * scale, uniform noise levels
(FLUX.1-dev's scheduler shifts by resolution only at inference), timestep = sigma, guidance = guidance_scale,
velocity target. The kohya/ComfyUI file uses the original (BFL) module names: formats/native.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..formats.native import NativeLayout, NativeModule
from .base import Conditioning, vae_scale_factor
from .flow import FlowMatchingFamily

log = logging.getLogger("lora_trainer")


def bfl_layout(config) -> NativeLayout:
    """The original (BFL) module names of a FluxTransformer2DModel, as sd-scripts and ComfyUI name them."""
    inner = config.num_attention_heads * config.attention_head_dim
    mlp = 4 * inner  # FLUX.1's mlp_ratio: linear1 stacks q, k, v (inner rows each) and the MLP input
    modules = []
    for i in range(config.num_layers):
        b = f"transformer_blocks.{i}"
        for stream, attn, ff, mod in (
            ("img", ("to_q", "to_k", "to_v"), "ff", "norm1"),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "ff_context", "norm1_context"),
        ):
            d = f"double_blocks.{i}.{stream}"
            out = "to_out.0" if stream == "img" else "to_add_out"
            modules += [
                NativeModule(f"{d}_mod.lin", ((f"{b}.{mod}.linear", None),)),
                NativeModule(f"{d}_attn.qkv", tuple((f"{b}.attn.{p}", inner) for p in attn)),
                NativeModule(f"{d}_attn.proj", ((f"{b}.attn.{out}", None),)),
                NativeModule(f"{d}_mlp.0", ((f"{b}.{ff}.net.0.proj", None),)),
                NativeModule(f"{d}_mlp.2", ((f"{b}.{ff}.net.2", None),)),
            ]
    for i in range(config.num_single_layers):
        b, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        modules += [
            NativeModule(
                f"{d}.linear1",
                (
                    (f"{b}.attn.to_q", inner),
                    (f"{b}.attn.to_k", inner),
                    (f"{b}.attn.to_v", inner),
                    (f"{b}.proj_mlp", mlp),
                ),
            ),
            NativeModule(f"{d}.linear2", ((f"{b}.proj_out", None),)),
            NativeModule(f"{d}.modulation.lin", ((f"{b}.norm.linear", None),)),
        ]
    top = [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("final_layer.linear", "proj_out"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ]
    modules += [NativeModule(name, ((path, None),)) for name, path in top]
    modules.append(NativeModule("final_layer.adaLN_modulation.1", (("norm_out.linear", None),), swap_halves=True))
    return NativeLayout(tuple(modules))


# the transformer's output layers (top-level proj_out and norm_out.linear), BFL's final_layer
FINAL_LAYER = ("transformer.proj_out.", "transformer.norm_out.")


class Flux1(FlowMatchingFamily):
    name = "flux1"
    pipeline_class = "FluxPipeline"
    denoiser_class = "FluxTransformer2DModel"
    text_encoder_subfolders = ("text_encoder", "text_encoder_2")
    tokenizer_subfolders = ("tokenizer", "tokenizer_2")
    # train_dreambooth_lora_flux.py's default: attention and feed-forward of both streams (the single blocks'
    # q/k/v through the suffix match)
    default_targets = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    default_guidance = 3.5

    def encoder_pipeline(self):
        from diffusers import FluxPipeline

        t1, t2 = self.parts.text_encoders
        k1, k2 = self.parts.tokenizers
        return FluxPipeline(
            scheduler=None, vae=None, text_encoder=t1, tokenizer=k1, text_encoder_2=t2, tokenizer_2=k2, transformer=None
        )

    def encode_prompts(self, batch: dict[str, Any]) -> Conditioning:
        """{"prompt_embeds": (B, L, D_t5), "pooled_prompt_embeds": (B, D_clip)}, as FluxPipeline encodes."""
        embeds, pooled, _ = self.encoder_pipeline().encode_prompt(
            prompt=batch["caption"], prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length()
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        from diffusers import FluxPipeline

        transformer = self.parts.denoiser
        dtype = self.dtype_of(transformer)
        b, c, h, w = noisy.shape  # (B, 16, h, w)
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)  # (B, h/2 * w/2, 64)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, dtype)
        text = cond["prompt_embeds"]
        text_ids = torch.zeros(text.shape[1], 3, device=self.device, dtype=dtype)
        guidance = (
            torch.full((b,), self.cfg.guidance_scale, device=self.device)
            if transformer.config.guidance_embeds
            else None
        )
        pred = transformer(
            hidden_states=packed.to(dtype),
            timestep=sigmas.to(dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=text.to(dtype),
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        factor = vae_scale_factor(self.parts.vae)
        return FluxPipeline._unpack_latents(pred, h * factor, w * factor, factor)  # (B, 16, h, w)

    def caption_limit(self) -> tuple[Any, int]:
        return self.parts.tokenizers[1], self.max_sequence_length()  # T5; CLIP's 77 tokens feed only the pooled vector

    # -- sampling
    def sample(
        self, prompt: str, generator: torch.Generator, width: int, height: int, steps: int, guidance: float | None
    ):
        import diffusers

        parts = self.parts
        pipe = diffusers.FluxPipeline(
            scheduler=parts.scheduler,
            vae=parts.vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=parts.denoiser,
        )
        pipe.set_progress_bar_config(disable=True)
        cond = self.sampling_cond[prompt]
        return pipe(
            prompt_embeds=cond["prompt_embeds"][None].to(self.device, self.dtype),
            pooled_prompt_embeds=cond["pooled_prompt_embeds"][None].to(self.device, self.dtype),
            guidance_scale=self.guidance(guidance),
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=generator,
            max_sequence_length=cond["prompt_embeds"].shape[0],
        ).images[0]

    # -- outputs
    @staticmethod
    def native_layout(denoiser: torch.nn.Module) -> NativeLayout:
        return bfl_layout(denoiser.config)

    def extra_files(self, out: Path, weights: dict[str, torch.Tensor], meta: dict[str, str]) -> list[tuple[Path, str]]:
        final = sorted({k.split(".lora_")[0] for k in weights if k.startswith(FINAL_LAYER)})
        if final:  # checked with sd-scripts 48d368f: its strict load raises, flux_merge_lora.py applies them
            log.warning(
                "the kohya file holds LoRAs of %s (BFL's final_layer): ComfyUI and sd-scripts' flux_merge_lora.py "
                "apply them, but sd-scripts' LoRA network has no final_layer modules, so its inference script "
                "refuses the file and its other loaders drop those keys. A target_modules entry proj_out also "
                "matches the top-level proj_out: to leave it out, list the single blocks' layers by their full "
                "names (single_transformer_blocks.0.proj_out, ...)",
                ", ".join(final),
            )
        return super().extra_files(out, weights, meta)

    def kohya_metadata(self) -> dict[str, str]:
        dev = bool(self.parts.denoiser.config.guidance_embeds)
        return {
            "ss_network_module": "networks.lora_flux",
            "ss_base_model_version": "flux1",
            "modelspec.architecture": "flux-1-dev/lora" if dev else "flux-1-schnell/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        }
