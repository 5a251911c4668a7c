"""FLUX.2 ([dev] with Mistral Small 3.1, [klein] with Qwen3): a rectified-flow transformer fed by three stacked
hidden layers of its text model, 32-channel latents patchified 2x2 and normalized by the VAE's batch-norm
statistics, and for [dev] a guidance input.

The step is diffusers' train_dreambooth_lora_flux2.py: the VAE's mean (not a sample), patchify, batch-norm
normalization, uniform noise levels (the scheduler shifts only at inference), timestep = sigma, guidance =
guidance_scale where the model has a guidance input, velocity target. Prompts go through the pipeline's own
encode_prompt with its own text layers (klein's script uses other layers than its pipeline; the pipeline's
are what sampling uses, so we train with those). The kohya/ComfyUI file uses BFL's names as musubi-tuner's
networks.lora_flux_2 writes them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..formats.native import NativeLayout, NativeModule
from .base import Conditioning
from .flow import FlowMatchingFamily


def bfl_layout(config) -> NativeLayout:
    """The original (BFL) module names of a Flux2Transformer2DModel."""
    inner = config.num_attention_heads * config.attention_head_dim
    modules = []
    for i in range(config.num_layers):
        b, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        modules += [
            NativeModule(f"{d}.img_attn.qkv", tuple((f"{b}.attn.{p}", inner) for p in ("to_q", "to_k", "to_v"))),
            NativeModule(f"{d}.img_attn.proj", ((f"{b}.attn.to_out.0", None),)),
            NativeModule(f"{d}.img_mlp.0", ((f"{b}.ff.linear_in", None),)),
            NativeModule(f"{d}.img_mlp.2", ((f"{b}.ff.linear_out", None),)),
            NativeModule(
                f"{d}.txt_attn.qkv", tuple((f"{b}.attn.{p}", inner) for p in ("add_q_proj", "add_k_proj", "add_v_proj"))
            ),
            NativeModule(f"{d}.txt_attn.proj", ((f"{b}.attn.to_add_out", None),)),
            NativeModule(f"{d}.txt_mlp.0", ((f"{b}.ff_context.linear_in", None),)),
            NativeModule(f"{d}.txt_mlp.2", ((f"{b}.ff_context.linear_out", None),)),
        ]
    for i in range(config.num_single_layers):
        b, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        modules += [
            NativeModule(f"{d}.linear1", ((f"{b}.attn.to_qkv_mlp_proj", None),)),  # fused in both layouts
            NativeModule(f"{d}.linear2", ((f"{b}.attn.to_out", None),)),
        ]
    top = [
        ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
        ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
        ("single_stream_modulation.lin", "single_stream_modulation.linear"),
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("final_layer.linear", "proj_out"),
        ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
        ("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    ]
    modules += [NativeModule(name, ((path, None),)) for name, path in top]
    modules.append(NativeModule("final_layer.adaLN_modulation.1", (("norm_out.linear", None),), swap_halves=True))
    return NativeLayout(tuple(modules))


class Flux2(FlowMatchingFamily):
    name = "flux2"
    pipeline_class = "Flux2Pipeline"
    denoiser_class = "Flux2Transformer2DModel"
    posterior_mode = True
    default_guidance = 4.0

    @property
    def targets(self) -> list[str]:
        """train_dreambooth_lora_flux2.py's default: the double blocks' image attention, and the single blocks'
        fused input and output projections (attn.to_out is named per block: in double blocks it is a list)."""
        if self.cfg.target_modules:
            return list(self.cfg.target_modules)
        singles = self.transformer_config()["num_single_layers"]
        return [
            "to_k",
            "to_q",
            "to_v",
            "to_out.0",
            "to_qkv_mlp_proj",
            *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)),
        ]

    def transformer_config(self) -> dict[str, Any]:
        from diffusers import Flux2Transformer2DModel

        return dict(Flux2Transformer2DModel.load_config(self.config_source, subfolder="transformer"))

    def pipeline_type(self):
        import diffusers

        return getattr(diffusers, self.model_index()["_class_name"])  # Flux2Pipeline or Flux2KleinPipeline

    def encode_prompts(self, batch: dict[str, Any]) -> Conditioning:
        """{"prompt_embeds": (B, L, 3 * D)}: the pipeline's stacked text layers."""
        pipe = self.pipeline_type()(
            scheduler=None,
            vae=None,
            text_encoder=self.parts.text_encoders[0],
            tokenizer=self.parts.tokenizers[0],
            transformer=None,
        )
        embeds, _ = pipe.encode_prompt(
            batch["caption"], device=self.device, max_sequence_length=self.max_sequence_length()
        )
        return {"prompt_embeds": embeds}

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        vae = self.parts.vae
        patches = Flux2Pipeline._patchify_latents(latents)  # (B, 4C, h/2, w/2)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        var = vae.bn.running_var.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return (patches - mean) / torch.sqrt(var + vae.config.batch_norm_eps)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1]  # already 2x2 patches

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        transformer = self.parts.denoiser
        dtype = self.dtype_of(transformer)
        image_ids = Flux2Pipeline._prepare_latent_ids(noisy).to(self.device)  # (B, h*w, 4)
        packed = Flux2Pipeline._pack_latents(noisy)  # (B, h*w, 4C)
        text = cond["prompt_embeds"].to(dtype)
        text_ids = Flux2Pipeline._prepare_text_ids(text).to(self.device)
        guidance = (
            torch.full((noisy.shape[0],), self.cfg.guidance_scale, device=self.device)
            if transformer.config.guidance_embeds
            else None
        )
        pred = transformer(
            hidden_states=packed.to(dtype),
            timestep=sigmas.to(dtype),
            guidance=guidance,
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return Flux2Pipeline._unpack_latents_with_ids(pred[:, : packed.shape[1]], image_ids)  # (B, 4C, h, w)

    # -- sampling
    def sample(
        self, prompt: str, generator: torch.Generator, width: int, height: int, steps: int, guidance: float | None
    ):
        parts = self.parts
        pipe = self.pipeline_type()(
            scheduler=parts.scheduler, vae=parts.vae, text_encoder=None, tokenizer=None, transformer=parts.denoiser
        )
        pipe.set_progress_bar_config(disable=True)
        embeds = {
            f"{prefix}prompt_embeds": self.sampling_cond[p]["prompt_embeds"][None].to(self.device, self.dtype)
            for prefix, p in (("", prompt), ("negative_", ""))
        }
        if "negative_prompt_embeds" not in inspect.signature(pipe.__call__).parameters:
            del embeds["negative_prompt_embeds"]  # [dev] is guidance-distilled: no negative prompt
        return pipe(
            **embeds,
            guidance_scale=self.guidance(guidance),
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=generator,
        ).images[0]

    # -- outputs
    @staticmethod
    def native_layout(denoiser: torch.nn.Module) -> NativeLayout:
        return bfl_layout(denoiser.config)

    def kohya_metadata(self) -> dict[str, str]:
        klein = self.model_index()["_class_name"] == "Flux2KleinPipeline"
        return {
            "ss_network_module": "networks.lora_flux_2",
            "ss_base_model_version": "flux_2_klein" if klein else "flux_2_dev",
            "modelspec.architecture": "Flux.2-klein/lora" if klein else "Flux.2-dev/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux2",
        }
