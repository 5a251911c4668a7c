"""Z-Image: a single-stream DiT fed by Qwen3's penultimate hidden states (unpadded, one sequence per prompt),
with FLUX's VAE and a static-shift scheduler.

The step is diffusers' train_dreambooth_lora_z_image.py: the VAE's mean (not a sample), (z - shift) * scale,
noise levels shifted by the scheduler's 3.0, and its reversed time convention: the transformer gets
t = 1 - sigma and predicts x0 - noise, so its output is negated into the velocity. The kohya/ComfyUI file is
musubi-tuner's ComfyUI layout (fused attention.qkv, attention.out): formats/native.py.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats.native import NativeLayout, NativeModule, linear_paths
from .base import Conditioning
from .flow import FlowMatchingFamily
from .qwen_image import pad_sequences


def comfy_layout(model: torch.nn.Module) -> NativeLayout:
    """ComfyUI's Z-Image (NextDiT) names: q/k/v fused into attention.qkv, to_out.0 is attention.out, the
    patch-size-keyed embedder and final layer under their plain names."""
    dim = model.config.dim
    modules, done = [], set()
    for path in linear_paths(model):
        if path in done:
            continue
        block, _, leaf = path.rpartition(".attention.")
        if leaf in ("to_q", "to_k", "to_v"):
            parts = tuple((f"{block}.attention.{p}", dim) for p in ("to_q", "to_k", "to_v"))
            modules.append(NativeModule(f"{block}.attention.qkv", parts))
            done.update(p for p, _ in parts)
        elif leaf == "to_out.0":
            modules.append(NativeModule(f"{block}.attention.out", ((path, None),)))
        else:
            name = path.replace("all_x_embedder.2-1", "x_embedder").replace("all_final_layer.2-1", "final_layer")
            modules.append(NativeModule(name, ((path, None),)))
    return NativeLayout(tuple(modules))


class ZImage(FlowMatchingFamily):
    name = "z-image"
    pipeline_class = "ZImagePipeline"
    denoiser_class = "ZImageTransformer2DModel"
    block_attributes = ("noise_refiner", "context_refiner", "layers")
    posterior_mode = True
    default_guidance = 5.0

    def encode_prompts(self, batch: dict[str, Any]) -> Conditioning:
        """{"prompt_embeds": (B, L, D) zero-padded, "prompt_lengths": (B,)}, from ZImagePipeline's list of
        unpadded sequences."""
        from diffusers import ZImagePipeline

        pipe = ZImagePipeline(
            scheduler=None,
            vae=None,
            text_encoder=self.parts.text_encoders[0],
            tokenizer=self.parts.tokenizers[0],
            transformer=None,
        )
        sequences, _ = pipe.encode_prompt(
            batch["caption"],
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length(),
        )
        return self.collate_prompts([{"prompt_embeds": s} for s in sequences])

    def split_prompts(self, cond: Conditioning, count: int) -> list[Conditioning]:
        return [{"prompt_embeds": cond["prompt_embeds"][i, : int(n)]} for i, n in enumerate(cond["prompt_lengths"])]

    def collate_prompts(self, entries: list[Conditioning]) -> Conditioning:
        embeds, mask = pad_sequences([e["prompt_embeds"] for e in entries])
        return {"prompt_embeds": embeds, "prompt_lengths": mask.sum(dim=1)}

    def sequences(self, cond: Conditioning) -> list[torch.Tensor]:
        dtype = self.dtype_of(self.parts.denoiser)
        return [cond["prompt_embeds"][i, : int(n)].to(dtype) for i, n in enumerate(cond["prompt_lengths"])]

    def predict(self, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        transformer = self.parts.denoiser
        dtype = self.dtype_of(transformer)
        frames = list(noisy.to(dtype).unsqueeze(2).unbind(0))  # B x (C, 1, h, w)
        out = transformer(frames, (1 - sigmas).to(dtype), self.sequences(cond), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the model predicts x0 - noise: negated into the velocity

    # -- sampling
    def sample(
        self, prompt: str, generator: torch.Generator, width: int, height: int, steps: int, guidance: float | None
    ):
        import diffusers

        parts = self.parts
        pipe = diffusers.ZImagePipeline(
            scheduler=parts.scheduler, vae=parts.vae, text_encoder=None, tokenizer=None, transformer=parts.denoiser
        )
        pipe.set_progress_bar_config(disable=True)
        cond, negative = (self.sampling_cond[p]["prompt_embeds"].to(self.device, self.dtype) for p in (prompt, ""))
        return pipe(
            prompt_embeds=[cond],
            negative_prompt_embeds=[negative],
            guidance_scale=self.guidance(guidance),
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=generator,
        ).images[0]

    # -- outputs
    @staticmethod
    def native_layout(denoiser: torch.nn.Module) -> NativeLayout:
        return comfy_layout(denoiser)

    def kohya_metadata(self) -> dict[str, str]:
        return {
            "ss_network_module": "networks.lora_zimage",
            "ss_base_model_version": "z_image",
            "modelspec.architecture": "Z-Image/lora",
            "modelspec.implementation": "https://github.com/Tongyi-MAI/Z-Image",
        }
