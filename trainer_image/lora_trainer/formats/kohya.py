"""kohya-ss / A1111 / ComfyUI LoRA files: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`.

Module names are the model's dotted module paths with '.' -> '_'. For SD 1.x/2.x the UNet part uses the
diffusers module names (`lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`): that is
what kohya's sd-scripts itself writes for SD 1.x/2.x, so its own tools read it, and A1111, ComfyUI and
diffusers all load it. The LDM spelling (`lora_unet_input_blocks_4_1_...`, kohya's SDXL convention) can be
written too (`unet_names="ldm"`); it needs the UNet config, because the LDM block numbers depend on the
layout. Text encoders are `lora_te_text_model_encoder_layers_<i>_<module>` (`lora_te1_`/`lora_te2_` for two).

Going back from '_' to '.' needs to know which underscores belong to a name (`to_q`, `proj_in`): the
names below are every such identifier in the SD UNets (diffusers and LDM spelling) and CLIP encoders.
A module whose name cannot make the round trip is refused when writing, never written ambiguously.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from .. import __version__
from ..errors import ModelError
from .ldm import unet_from_ldm, unet_to_ldm
from .lora import TEXT_ENCODERS, UNET, LoraSet, LoraWeight

UNET_PREFIX = "lora_unet"
TEXT_PREFIXES = {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
LDM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")

# identifiers with underscores, longest first within each length
COMPOUND_NAMES = tuple(
    tuple(name.split("_"))
    for name in sorted(
        {
            # diffusers UNet
            "down_blocks",
            "up_blocks",
            "mid_block",
            "conv_in",
            "conv_out",
            "conv_norm_out",
            "time_embedding",
            "linear_1",
            "linear_2",
            "time_emb_proj",
            "conv_shortcut",
            "transformer_blocks",
            "proj_in",
            "proj_out",
            "to_q",
            "to_k",
            "to_v",
            "to_out",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
            "add_embedding",
            "class_embedding",
            "encoder_hid_proj",
            # LDM UNet
            "input_blocks",
            "middle_block",
            "output_blocks",
            "in_layers",
            "out_layers",
            "emb_layers",
            "skip_connection",
            "time_embed",
            "label_emb",
            # CLIP text encoders
            "text_model",
            "token_embedding",
            "position_embedding",
            "self_attn",
            "q_proj",
            "k_proj",
            "v_proj",
            "out_proj",
            "layer_norm1",
            "layer_norm2",
            "final_layer_norm",
            "text_projection",
        },
        key=lambda n: (-n.count("_"), n),
    )
)


# -- names
def _join(tokens: list[str]) -> str:
    """Underscore-separated tokens back to a dotted path, keeping compound identifiers whole."""
    parts, i = [], 0
    while i < len(tokens):
        for compound in COMPOUND_NAMES:
            if tuple(tokens[i : i + len(compound)]) == compound:
                parts.append("_".join(compound))
                i += len(compound)
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def text_prefixes(two_text_encoders: bool) -> dict[str, str]:
    """component -> kohya prefix: 'lora_te' for one text encoder, 'lora_te1'/'lora_te2' for two (SDXL)."""
    if two_text_encoders:
        return {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    return {"text_encoder": "lora_te"}


def kohya_name(
    component: str, path: str, two_text_encoders: bool = False, unet_config: Mapping[str, Any] | None = None
) -> str:
    """('unet', 'down_blocks.1.attentions.0.proj_in') -> 'lora_unet_down_blocks_1_attentions_0_proj_in';
    with unet_config, the UNet name is written in LDM spelling ('lora_unet_input_blocks_4_1_proj_in' for
    SD 1.5). Text-encoder paths always carry 'text_model.', as A1111 and ComfyUI look them up."""
    if component == UNET:
        name = unet_to_ldm(path, unet_config) if unet_config is not None else path
        prefix = UNET_PREFIX
    elif component in TEXT_ENCODERS:
        prefix = text_prefixes(two_text_encoders or component == "text_encoder_2").get(component)
        name = path if path.startswith("text_model.") else "text_model." + path
    else:
        raise ModelError(f"component {component!r} has no kohya prefix (kohya files hold unet and text encoders)")
    return f"{prefix}_{name.replace('.', '_')}"


def parse_kohya_name(name: str, unet_config: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """The inverse of kohya_name: 'lora_te_text_model_encoder_layers_0_self_attn_q_proj' ->
    ('text_encoder', 'text_model.encoder.layers.0.self_attn.q_proj'). LDM-spelled UNet names need the
    UNet config to find their diffusers block."""
    for prefix, component in sorted(TEXT_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(prefix + "_"):
            return component, _join(name[len(prefix) + 1 :].split("_"))
    if not name.startswith(UNET_PREFIX + "_"):
        raise ModelError(f"{name} is not a kohya LoRA name (lora_unet_..., lora_te_..., lora_te1_/lora_te2_...)")
    path = _join(name[len(UNET_PREFIX) + 1 :].split("_"))
    if path.split(".")[0] in LDM_BLOCKS or path.startswith(("time_embed.", "out.", "label_emb.")):
        if unet_config is None:
            raise ModelError(f"{name} uses LDM block names; converting it needs the UNet config (--base-config)")
        path = unet_from_ldm(path, unet_config)
    return UNET, path


def same_module(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Equal up to the 'text_model.' that transformers >= 5.6 drops from CLIPTextModel paths."""

    def norm(key):
        component, path = key
        return component, path.removeprefix("text_model.") if component in TEXT_ENCODERS else path

    return norm(a) == norm(b)


# -- files
def is_kohya(tensors: Mapping[str, Any]) -> bool:
    prefixes = (UNET_PREFIX + "_", *(p + "_" for p in TEXT_PREFIXES))
    return bool(tensors) and all(k.startswith(prefixes) for k in tensors)


def from_kohya(tensors: dict[str, torch.Tensor], unet_config: Mapping[str, Any] | None = None) -> LoraSet:
    """Parses a kohya file; a missing `.alpha` means alpha = rank (kohya's own default when loading)."""
    names = {k.split(".", 1)[0] for k in tensors}
    out: LoraSet = {}
    for name in sorted(names):
        down, up = tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight")
        extra = {k for k in tensors if k.startswith(name + ".")} - {
            f"{name}.lora_down.weight",
            f"{name}.lora_up.weight",
            f"{name}.alpha",
        }
        if extra:
            raise ModelError(f"unsupported kohya LoRA keys (LoHa/LoKr/DoRA are not LoRA): {sorted(extra)[:3]}")
        if down is None or up is None:
            raise ModelError(f"kohya LoRA {name} lacks its lora_down or lora_up weight")
        alpha = tensors.get(f"{name}.alpha")
        key = parse_kohya_name(name, unet_config)
        out[key] = LoraWeight(down, up, float(alpha.item()) if alpha is not None else float(down.shape[0]))
    return out


def to_kohya(loras: LoraSet, unet_config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Tensors with kohya keys and the real alpha of each module as a float32 scalar."""
    two = any(c == "text_encoder_2" for c, _ in loras)
    out: dict[str, torch.Tensor] = {}
    for (component, path), weight in sorted(loras.items()):
        name = kohya_name(component, path, two, unet_config)
        back = parse_kohya_name(name, unet_config)
        if not same_module(back, (component, path)):
            raise ModelError(
                f"{component} module {path} cannot be written unambiguously as a kohya name "
                f"({name} would read back as {back[1]})"
            )
        if name + ".lora_down.weight" in out:
            raise ModelError(f"two modules map to the same kohya name {name}")
        out[name + ".lora_down.weight"] = weight.down.contiguous()
        out[name + ".lora_up.weight"] = weight.up.contiguous()
        out[name + ".alpha"] = torch.tensor(weight.alpha, dtype=torch.float32)
    return out


# -- metadata
def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0] if values else None


def base_model_version(loras: LoraSet, family: str | None = None) -> tuple[str, str, bool]:
    """(ss_base_model_version, modelspec architecture, is_v2): SDXL from the model family (or a second
    text encoder); SD 2.x from the shapes (it cross-attends to 1024-wide OpenCLIP states, SD 1.x to 768).
    Tiny test models count as v1."""
    if family == "sdxl" or any(c == "text_encoder_2" for c, _ in loras):
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", False
    widths = {w.down.shape[1] for (c, p), w in loras.items() if c == UNET and ".attn2.to_k" in p}
    widths |= {w.down.shape[1] for (c, p), w in loras.items() if c in TEXT_ENCODERS}
    if 1024 in widths:
        return "sd_v2", "stable-diffusion-v2-768-v/lora", True
    return "sd_v1", "stable-diffusion-v1/lora", False


def network_shape(loras: LoraSet) -> dict[str, str]:
    """ss_network_dim/alpha for the linear (and 1x1 conv) modules; 3x3 convs are kohya's conv_dim/alpha."""

    def is_conv3(w: LoraWeight) -> bool:
        return w.down.dim() == 4 and tuple(w.down.shape[2:]) != (1, 1)

    linear = [w for w in loras.values() if not is_conv3(w)]
    conv = [w for w in loras.values() if is_conv3(w)]
    meta = {"ss_network_module": "networks.lora"}
    if linear:
        meta["ss_network_dim"] = str(_most_common([w.rank for w in linear]))
        meta["ss_network_alpha"] = f"{_most_common([w.alpha for w in linear]):g}"
    args = {}
    if conv:
        args = {
            "conv_dim": str(_most_common([w.rank for w in conv])),
            "conv_alpha": f"{_most_common([w.alpha for w in conv]):g}",
        }
    meta["ss_network_args"] = json.dumps(args)
    return meta


def kohya_metadata(
    loras: LoraSet, metadata: Mapping[str, str], training: Mapping[str, str] | None = None, now: float | None = None
) -> dict[str, str]:
    """ss_* (kohya/A1111's additional-networks) and modelspec.* (Stability's model spec) keys.
    Keys already in `metadata` win, so a file converted back and forth keeps its original values."""
    version, architecture, v2 = base_model_version(loras, metadata.get("model_family"))
    now = time.time() if now is None else now
    out = {
        **network_shape(loras),
        "ss_base_model_version": version,
        "ss_v2": str(v2),
        "ss_sd_model_name": metadata.get("base_model", ""),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": "lora",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        "modelspec.author": f"lora-operator {__version__}",
    }
    out.update(training or {})
    out.update({k: v for k, v in metadata.items() if k != "lora_adapter_metadata"})
    return out
