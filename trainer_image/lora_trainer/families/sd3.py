"""Stable Diffusion 3 and 3.5: an MMDiT with two CLIP encoders (pooled, penultimate states) and T5, 16-channel
latents patchified inside the transformer.

The step is diffusers' train_dreambooth_lora_sd3.py: logit-normal noise levels shifted by the scheduler's
static shift (3.0), the raw timestep (sigma * 1000), and its default precondition_outputs: the velocity is
turned into an estimate of the clean latents, which is compared with them (the velocity loss weighted by
sigma squared). T5 prompts are 77 tokens as in that script. The kohya/ComfyUI file uses SAI's module names
as sd-scripts' networks.lora_sd3 writes them: formats/native.py.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.native import NativeLayout, NativeModule
from .base import Conditioning, vae_scale_factor
from .flow import FlowMatchingFamily


def sai_layout(config) -> NativeLayout:
    """SAI's MMDiT names (joint_blocks.N.x_block / context_block) of an SD3Transformer2DModel."""
    inner = config.num_attention_heads * config.attention_head_dim
    dual = set(config.get("dual_attention_layers") or ())
    modules = []
    for i in range(config.num_layers):
        b, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == config.num_layers - 1  # its context block only feeds the image stream: no proj, no mlp
        modules += [
            NativeModule(f"{j}.x_block.attn.qkv", tuple((f"{b}.attn.{p}", inner) for p in ("to_q", "to_k", "to_v"))),
            NativeModule(f"{j}.x_block.attn.proj", ((f"{b}.attn.to_out.0", None),)),
            NativeModule(f"{j}.x_block.mlp.fc1", ((f"{b}.ff.net.0.proj", None),)),
            NativeModule(f"{j}.x_block.mlp.fc2", ((f"{b}.ff.net.2", None),)),
            NativeModule(f"{j}.x_block.adaLN_modulation.1", ((f"{b}.norm1.linear", None),)),
            NativeModule(
                f"{j}.context_block.attn.qkv",
                tuple((f"{b}.attn.{p}", inner) for p in ("add_q_proj", "add_k_proj", "add_v_proj")),
            ),
            NativeModule(
                f"{j}.context_block.adaLN_modulation.1", ((f"{b}.norm1_context.linear", None),), swap_halves=last
            ),
        ]
        if not last:
            modules += [
                NativeModule(f"{j}.context_block.attn.proj", ((f"{b}.attn.to_add_out", None),)),
                NativeModule(f"{j}.context_block.mlp.fc1", ((f"{b}.ff_context.net.0.proj", None),)),
                NativeModule(f"{j}.context_block.mlp.fc2", ((f"{b}.ff_context.net.2", None),)),
            ]
        if i in dual:  # SD3.5-medium's second image attention
            modules += [
                NativeModule(
                    f"{j}.x_block.attn2.qkv", tuple((f"{b}.attn2.{p}", inner) for p in ("to_q", "to_k", "to_v"))
                ),
                NativeModule(f"{j}.x_block.attn2.proj", ((f"{b}.attn2.to_out.0", None),)),
            ]
    top = [
        ("context_embedder", "context_embedder"),
        ("final_layer.linear", "proj_out"),
        ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ]
    modules += [NativeModule(name, ((path, None),)) for name, path in top]
    modules.append(NativeModule("final_layer.adaLN_modulation.1", (("norm_out.linear", None),), swap_halves=True))
    return NativeLayout(tuple(modules))


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    text_encoder_subfolders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_subfolders = ("tokenizer", "tokenizer_2", "tokenizer_3")
    default_targets = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )
    default_weighting = "logit_normal"
    default_sequence_length = 77  # train_dreambooth_lora_sd3.py's (the pipeline samples with 256)
    default_guidance = 7.0

    def encoder_pipeline(self):
        from diffusers import StableDiffusion3Pipeline

        encoders, tokenizers = self.parts.text_encoders, self.parts.tokenizers
        return StableDiffusion3Pipeline(
            transformer=None,
            scheduler=None,
            vae=None,
            text_encoder=encoders[0],
            tokenizer=tokenizers[0],
            text_encoder_2=encoders[1],
            tokenizer_2=tokenizers[1],
            text_encoder_3=encoders[2],
            tokenizer_3=tokenizers[2],
        )

    def encode_prompts(self, batch: dict[str, Any]) -> Conditioning:
        """{"prompt_embeds": (B, 77 + L, D): both CLIPs' penultimate states (zero-padded to T5's width) then T5's,
        "pooled_prompt_embeds": (B, D_L + D_G)}, as StableDiffusion3Pipeline encodes."""
        embeds, _, pooled, _ = self.encoder_pipeline().encode_prompt(
            prompt=batch["caption"],
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length(),
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def size_multiple(self) -> tuple[int, str]:
        patch = self.parts.denoiser.config.patch_size
        return vae_scale_factor(self.parts.vae) * patch, f"the VAE's downscale factor times the {patch}x{patch} patches"

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        transformer = self.parts.denoiser
        dtype = self.dtype_of(transformer)
        timesteps = sigmas * self.parts.scheduler.config.num_train_timesteps  # SD3 takes 0..1000
        return transformer(
            hidden_states=noisy.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]

    def objective(self, pred, noisy, noise, latents, s):
        """precondition_outputs: x0 = x_t - sigma * v, compared with the clean latents."""
        return pred * (-s) + noisy, latents

    def image_seq_len(self, latents: torch.Tensor) -> int:
        patch = self.parts.denoiser.config.patch_size
        return (latents.shape[-2] // patch) * (latents.shape[-1] // patch)

    def caption_limit(self) -> tuple[Any, int]:
        return self.parts.tokenizers[2], self.max_sequence_length()

    # -- sampling
    def sample(
        self, prompt: str, generator: torch.Generator, width: int, height: int, steps: int, guidance: float | None
    ):
        import diffusers

        parts = self.parts
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=parts.denoiser,
            scheduler=parts.scheduler,
            vae=parts.vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        pipe.set_progress_bar_config(disable=True)
        cond, negative = self.sampling_cond[prompt], self.sampling_cond[""]
        args = {
            f"{prefix}{k}": v[None].to(self.device, self.dtype)
            for prefix, c in (("", cond), ("negative_", negative))
            for k, v in c.items()
        }
        return pipe(
            **args,
            guidance_scale=self.guidance(guidance),
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=generator,
        ).images[0]

    # -- outputs
    @staticmethod
    def native_layout(denoiser: torch.nn.Module) -> NativeLayout:
        return sai_layout(denoiser.config)

    def kohya_metadata(self) -> dict[str, str]:
        return {
            "ss_network_module": "networks.lora_sd3",
            "ss_base_model_version": "medium",
            "modelspec.architecture": "stable-diffusion-3-medium/lora",
            "modelspec.implementation": "diffusers",
        }
