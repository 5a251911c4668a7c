"""diffusers <-> original LDM (CompVis / A1111 / ComfyUI) names for Stable Diffusion 1.x and SDXL models.

The LDM UNet numbers its blocks flat (input_blocks.N, middle_block.N, output_blocks.N) where diffusers
nests them (down_blocks.b.resnets.j). The numbering depends on the UNet's config (block count, layers per
block, which blocks have attention), so the map is computed from the config, never hard-coded to SD 1.5's
4x2 layout: a tiny test UNet and SD 1.5 go through the same code. Used for single-file checkpoints
(merge output) and for kohya LoRA names in LDM spelling. Pure functions of names and configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ModelError

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # CLIP ViT-L, the transformers layout
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP bigG, OpenCLIP's own layout
# inside an OpenCLIP residual block: transformers name -> OpenCLIP name (q/k/v are fused into in_proj)
OPEN_CLIP_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}

# inside a UNet ResNet block: diffusers name -> LDM name (ResBlock's Sequential indices)
UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
# inside the VAE's mid-block attention: diffusers Linear layers -> LDM 1x1 convs
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
SUPPORTED_MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)


def _layers_per_block(config: Mapping[str, Any]) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise ModelError(f"UNet layers_per_block {layers} differs per block; the LDM layout cannot express it")
        layers = layers[0]
    return layers


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


def unet_block_map(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for every block of a UNet with this config."""
    n = _layers_per_block(config)
    pairs = [
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ]
    downs = config["down_block_types"]
    for b, kind in enumerate(downs):
        for j in range(n):
            index = 1 + b * (n + 1) + j
            pairs.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0"))
            if _has_attention(kind):
                pairs.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{index}.1"))
        if b < len(downs) - 1:
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{1 + b * (n + 1) + n}.0.op"))
    mid = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid not in SUPPORTED_MID_BLOCKS:
        raise ModelError(f"UNet mid_block_type {mid} has no LDM layout here (supported: {SUPPORTED_MID_BLOCKS})")
    pairs += [
        ("mid_block.resnets.0", "middle_block.0"),
        ("mid_block.attentions.0", "middle_block.1"),
        ("mid_block.resnets.1", "middle_block.2"),
    ]
    ups = config["up_block_types"]
    for b, kind in enumerate(ups):
        for j in range(n + 1):
            index = b * (n + 1) + j
            pairs.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0"))
            if _has_attention(kind):
                pairs.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{index}.1"))
        if b < len(ups) - 1:  # the upsampler follows the attention (if any) in the last layer of the block
            slot = 2 if _has_attention(kind) else 1
            pairs.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{b * (n + 1) + n}.{slot}.conv"))
    return pairs


def _rename(name: str, pairs: list[tuple[str, str]], inner: dict[str, str], inner_prefixes: set[str]) -> str | None:
    """Replaces the longest matching prefix; inside the blocks named by `inner_prefixes`, also renames the
    first segment after it (e.g. ResNet conv1 <-> in_layers.2). None if no prefix matches."""
    matches = [(src, dst) for src, dst in pairs if name == src or name.startswith(src + ".")]
    if not matches:
        return None
    src, dst = max(matches, key=lambda pair: len(pair[0]))
    rest = name[len(src) + 1 :]
    if rest and src in inner_prefixes:
        for old, new in sorted(inner.items(), key=lambda kv: -len(kv[0])):
            if rest == old or rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
    return f"{dst}.{rest}" if rest else dst


def unet_to_ldm(name: str, config: Mapping[str, Any]) -> str:
    """'down_blocks.1.attentions.0.proj_in' -> 'input_blocks.4.1.proj_in' with SD 1.5's config
    (module paths and parameter names alike)."""
    pairs = unet_block_map(config)
    out = _rename(name, pairs, UNET_RESNET_NAMES, {src for src, _ in pairs if "resnets" in src})
    if out is None:
        raise ModelError(f"UNet name {name} has no place in the LDM layout")
    return out


def unet_from_ldm(name: str, config: Mapping[str, Any]) -> str:
    """The inverse of unet_to_ldm."""
    pairs = [(dst, src) for src, dst in unet_block_map(config)]
    inverse = {v: k for k, v in UNET_RESNET_NAMES.items()}
    out = _rename(name, pairs, inverse, {ldm for ldm, src in pairs if "resnets" in src})
    if out is None:
        raise ModelError(f"LDM UNet name {name} matches no block of this UNet config")
    return out


def vae_block_map(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for an AutoencoderKL with this config."""
    downs, ups = len(config["down_block_types"]), len(config["up_block_types"])
    n = config["layers_per_block"]
    pairs = [("encoder.conv_norm_out", "encoder.norm_out"), ("decoder.conv_norm_out", "decoder.norm_out")]
    for side in ("encoder", "decoder"):
        pairs += [
            (f"{side}.mid_block.resnets.0", f"{side}.mid.block_1"),
            (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2"),
            (f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1"),
        ]
    for i in range(downs):
        for j in range(n):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}"))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample"))
    for i in range(ups):
        for j in range(n + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ups - 1 - i}.block.{j}"))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{ups - 1 - i}.upsample"))
    return pairs


def vae_to_ldm(name: str, config: Mapping[str, Any]) -> str:
    pairs = vae_block_map(config)
    inner = VAE_ATTENTION_NAMES if ".attentions." in name else VAE_RESNET_NAMES
    out = _rename(name, pairs, inner, {src for src, _ in pairs if "resnets" in src or "attentions" in src})
    return name if out is None else out  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def clip_to_ldm(name: str, prefix: str = LDM_CLIP_PREFIX) -> str:
    """transformers >= 5.6 flattens CLIPTextModel (no 'text_model.'); LDM checkpoints keep it."""
    return prefix + (name if name.startswith("text_model.") else "text_model." + name)


def open_clip_state(text_encoder: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights in OpenCLIP's layout (SDXL's second text encoder): q, k and v
    fused into one in_proj, the projection stored as the matrix that multiplies from the right."""
    flat = {k.removeprefix("text_model."): v for k, v in text_encoder.items() if not k.endswith("position_ids")}
    out = {
        "token_embedding.weight": flat.pop("embeddings.token_embedding.weight"),
        "positional_embedding": flat.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": flat.pop("final_layer_norm.weight"),
        "ln_final.bias": flat.pop("final_layer_norm.bias"),
        "text_projection": flat.pop("text_projection.weight").T,
    }
    for i in sorted({int(k.split(".")[2]) for k in flat if k.startswith("encoder.layers.")}):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([flat.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for old, new in OPEN_CLIP_LAYER_NAMES.items():
                out[f"{dst}{new}.{kind}"] = flat.pop(f"{src}{old}.{kind}")
    if flat:
        raise ModelError(f"text encoder weights with no place in OpenCLIP's layout: {', '.join(sorted(flat)[:5])}")
    return out


def ldm_checkpoint(
    unet: dict[str, torch.Tensor],
    vae: dict[str, torch.Tensor],
    text_encoders: list[dict[str, torch.Tensor]],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """A single-file checkpoint (what A1111, ComfyUI and diffusers' from_single_file read): SD 1.x with one
    text encoder, SDXL with two."""
    out: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor) -> None:
        if key in out:
            raise ModelError(f"two weights map to the same checkpoint key {key}")
        out[key] = value.contiguous()

    for name, value in unet.items():
        put(LDM_UNET_PREFIX + unet_to_ldm(name, unet_config), value)
    for name, value in vae.items():
        ldm = vae_to_ldm(name, vae_config)
        if ".mid.attn_1." in ldm and value.dim() == 2:  # the LDM VAE attention uses 1x1 convs
            value = value[:, :, None, None]
        put(LDM_VAE_PREFIX + ldm, value)
    if len(text_encoders) == 1:
        for name, value in text_encoders[0].items():
            put(clip_to_ldm(name), value)
    else:
        first, second = text_encoders
        for name, value in first.items():
            put(clip_to_ldm(name, SDXL_CLIP_PREFIX), value)
        for name, value in open_clip_state(second).items():
            put(SDXL_OPEN_CLIP_PREFIX + name, value)
    return out
