"""One in-memory form for a LoRA, whatever file format it came from.

A LoRA file is a set of (component, module path) -> (down, up, alpha). Every format this project reads
or writes (diffusers, kohya, peft) is a spelling of that set, so converting and merging go through
`LoraSet`: parse a file into it, write it back out in any format. Pure functions over tensors.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import ModelError

# the text-encoder component names diffusers uses in a LoRA file; the UNet is "unet"
UNET = "unet"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# suffixes of the down/up matrices in diffusers-format files, the spelling each writer uses
DOWN_UP_SUFFIXES = (
    (".lora.down.weight", ".lora.up.weight"),  # diffusers' training scripts, UNet
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),  # diffusers, text encoders
    (".lora_A.weight", ".lora_B.weight"),  # peft keys (newer diffusers files, peft adapters)
    (".lora_down.weight", ".lora_up.weight"),  # kohya spelling with dotted names (some converters)
)


@dataclass(frozen=True)
class LoraWeight:
    """One adapted module: W' = W + scale * (alpha / rank) * up @ down."""

    down: torch.Tensor  # (r, in) for Linear, (r, in, kh, kw) for Conv2d
    up: torch.Tensor  # (out, r) for Linear, (out, r, 1, 1) for Conv2d
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The weight update at scale 1, shaped like the module's weight."""
        down, up = self.down.float(), self.up.float()
        if down.dim() == 2:
            return (self.alpha / self.rank) * (up @ down)  # (out, in)
        # conv: down (r, in, kh, kw), up (out, r, 1, 1) -> (out, in, kh, kw)
        product = up.flatten(1) @ down.flatten(1)  # (out, in*kh*kw)
        return (self.alpha / self.rank) * product.reshape(up.shape[0], *down.shape[1:])


LoraSet = dict[tuple[str, str], LoraWeight]  # (component, module path) -> weights


def split_component(key: str) -> tuple[str, str]:
    """'unet.down_blocks.0...' -> ('unet', 'down_blocks.0...')."""
    component, _, rest = key.partition(".")
    return component, rest


def adapter_metadata(metadata: dict[str, str] | None) -> dict:
    """The `lora_adapter_metadata` JSON diffusers writes (per-component LoraConfig kwargs), or {}."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise ModelError("the file's lora_adapter_metadata is not valid JSON") from None
    return parsed if isinstance(parsed, dict) else {}


def diffusers_alpha(
    component: str,
    path: str,
    rank: int,
    tensors: dict[str, torch.Tensor],
    adapter: dict,
    metadata: dict[str, str] | None,
) -> float:
    """Alpha as diffusers would apply it: a `.alpha` tensor, then the adapter metadata, then the file's
    `alpha` metadata (this trainer's), else rank (scale 1, diffusers' default)."""
    alpha_key = f"{component}.{path}.alpha"
    if alpha_key in tensors:
        return float(tensors[alpha_key].item())
    pattern = adapter.get(f"{component}.alpha_pattern") or {}
    if path in pattern:
        return float(pattern[path])
    if f"{component}.lora_alpha" in adapter:
        return float(adapter[f"{component}.lora_alpha"])
    if metadata and "alpha" in metadata:
        return float(metadata["alpha"])
    return float(rank)


def from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> LoraSet:
    """Parses a diffusers-format LoRA (keys '<component>.<module>.lora.down.weight' and the variants
    in DOWN_UP_SUFFIXES). Every key must be accounted for: a silently dropped key would be a wrong merge."""
    adapter = adapter_metadata(metadata)
    out: LoraSet = {}
    used: set[str] = set()
    for key in tensors:
        for down_suffix, up_suffix in DOWN_UP_SUFFIXES:
            if not key.endswith(down_suffix):
                continue
            stem = key[: -len(down_suffix)]
            up_key = stem + up_suffix
            if up_key not in tensors:
                raise ModelError(f"LoRA key {key} has no matching {up_key}")
            component, path = split_component(stem)
            down, up = tensors[key], tensors[up_key]
            alpha = diffusers_alpha(component, path, down.shape[0], tensors, adapter, metadata)
            out[(component, path)] = LoraWeight(down, up, alpha)
            used.update({key, up_key, f"{stem}.alpha"})
            break
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ModelError(
            f"not a diffusers-format LoRA: {len(unknown)} key(s) are not LoRA down/up/alpha weights, e.g. {unknown[:3]}"
        )
    if not out:
        raise ModelError("the file holds no LoRA weights")
    return out


def to_diffusers(
    loras: LoraSet, metadata: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The keys this trainer writes (what diffusers' own training scripts write), and metadata whose
    lora_adapter_metadata carries rank and alpha per component, so load_lora_weights applies the real alpha."""
    tensors: dict[str, torch.Tensor] = {}
    for (component, path), weight in sorted(loras.items()):
        infix = ".lora" if component == UNET else ".lora_linear_layer"
        tensors[f"{component}.{path}{infix}.down.weight"] = weight.down.contiguous()
        tensors[f"{component}.{path}{infix}.up.weight"] = weight.up.contiguous()
    meta = dict(metadata or {})
    meta["lora_adapter_metadata"] = json.dumps(adapter_configs(loras), sort_keys=True)
    return tensors, meta


def uniform_diffusers_keys(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """One spelling for every module of a component. diffusers' convert_state_dict_to_diffusers renames
    only attention projections (to_q.lora_A -> to_q.lora.down), leaving e.g. conv1.lora_A; diffusers'
    loader converts a state dict only when its *first* key is not peft-style, so a mixed file silently
    loses the modules of the other spelling (all attention LoRAs when conv layers are trained too)."""
    infix = ".lora" if component == UNET else ".lora_linear_layer"
    renames = ((".lora_A.weight", f"{infix}.down.weight"), (".lora_B.weight", f"{infix}.up.weight"))
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        out[key] = value
    return out


CLIP_ROOT = "text_model."


def with_clip_root(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder keys spelled 'text_model.encoder...', as transformers < 5.6 names CLIP modules and as
    most published LoRAs are written; transformers >= 5.6 flattens the path, and diffusers loads both."""
    return {k if k.startswith(CLIP_ROOT) else CLIP_ROOT + k: v for k, v in state.items()}


def for_module(state: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Drops 'text_model.' again when the loaded CLIP has no such level (the inverse of with_clip_root)."""
    if hasattr(module, "text_model"):
        return state
    return {k.removeprefix(CLIP_ROOT): v for k, v in state.items()}


def adapter_configs(loras: LoraSet) -> dict:
    """Per component: r and lora_alpha (the most common ones), rank_pattern/alpha_pattern for the rest,
    and target_modules, under '<component>.' keys, as diffusers' lora_adapter_metadata expects."""
    out: dict = {}
    for component in sorted({c for c, _ in loras}):
        items = {path: w for (c, path), w in loras.items() if c == component}
        rank = Counter(w.rank for w in items.values()).most_common(1)[0][0]
        alpha = Counter(w.alpha for w in items.values()).most_common(1)[0][0]
        config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(items), "lora_dropout": 0.0}
        rank_pattern = {p: w.rank for p, w in items.items() if w.rank != rank}
        alpha_pattern = {p: w.alpha for p, w in items.items() if w.alpha != alpha}
        if rank_pattern:
            config["rank_pattern"] = rank_pattern
        if alpha_pattern:
            config["alpha_pattern"] = alpha_pattern
        out.update({f"{component}.{k}": v for k, v in config.items()})
    return out


def only(loras: LoraSet, component: str) -> dict[str, LoraWeight]:
    return {path: w for (c, path), w in loras.items() if c == component}


def diffusers_lora_metadata(prefix: str, rank: int, alpha: float, targets: list[str]) -> dict:
    """LoraConfig kwargs under `prefix.`, as diffusers' load_lora_weights reads them back."""
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "lora_dropout": 0.0}
    return {f"{prefix}.{k}": v for k, v in config.items()}
