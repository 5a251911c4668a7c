"""LoRA files in a model's original checkpoint layout, as kohya's sd-scripts and musubi-tuner write them and
ComfyUI loads them: `lora_unet_<original module path, '.' -> '_'>.lora_down.weight`, `.lora_up.weight`,
`.alpha` (the real alpha).

The original layouts (BFL's FLUX, SAI's SD3, ComfyUI's Z-Image) fuse projections that diffusers keeps apart:
FLUX's `img_attn.qkv` is diffusers' to_q, to_k and to_v stacked by rows. A LoRA trained on the separate
projections is written onto the fused module exactly: the down matrices stacked, the up matrices placed
block-diagonally, alpha times the number of parts (so alpha / rank stays each part's scale). Parts that were
not trained keep zero rows. Reading splits a fused module back into its parts (block-diagonal files into
the original ranks, any other file exactly with the shared down matrix).

Each family describes its layout (`NativeLayout`): every original module with the diffusers modules whose
rows it stacks. Names are looked up in that table in both directions, never split on '_'.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import ModelError
from ..layout import kohya_name
from .lora import LoraSet, LoraWeight, from_diffusers

KOHYA_PREFIX = "lora_unet"
COMPONENT = "transformer"


@dataclass(frozen=True)
class NativeModule:
    """One Linear of the original checkpoint and the diffusers modules whose outputs it stacks, in row order."""

    name: str  # "double_blocks.0.img_attn.qkv"
    parts: tuple[tuple[str, int | None], ...]  # ((diffusers module path, output rows; None when it is alone), ...)
    swap_halves: bool = False  # the original orders its two output halves the other way (shift/scale)

    @property
    def key(self) -> str:
        return f"{KOHYA_PREFIX}_{self.name.replace('.', '_')}"


@dataclass(frozen=True)
class NativeLayout:
    modules: tuple[NativeModule, ...]

    def by_part(self) -> dict[str, tuple[NativeModule, int]]:
        return {path: (m, i) for m in self.modules for i, (path, _) in enumerate(m.parts)}

    def by_key(self) -> dict[str, NativeModule]:
        return {m.key: m for m in self.modules}


def to_native(loras: LoraSet, layout: NativeLayout) -> dict[str, torch.Tensor]:
    """kohya tensors of the transformer LoRAs; a trained module outside the layout is an error, never dropped."""
    index = layout.by_part()
    trained = {path: w for (component, path), w in loras.items() if component == COMPONENT}
    unknown = sorted(set(trained) - set(index))
    if unknown:
        raise ModelError(
            f"{len(unknown)} trained module(s) have no name in the original checkpoint layout, e.g. {unknown[:3]}"
        )
    out: dict[str, torch.Tensor] = {}
    for module in layout.modules:
        parts = [(trained.get(path), rows) for path, rows in module.parts]
        if any(w is not None for w, _ in parts):
            out.update(fuse(module, parts))
    return out


def fuse(module: NativeModule, parts: list[tuple[LoraWeight | None, int]]) -> dict[str, torch.Tensor]:
    present = [w for w, _ in parts if w is not None]
    alphas = {w.alpha / w.rank for w in present}
    if len(alphas) > 1:
        raise ModelError(
            f"{module.name}: its parts were trained with different alpha/rank; kohya's one alpha "
            "per module cannot hold them"
        )
    down = torch.cat([w.down for w in present])  # (n * r, in)
    sizes = [w.up.shape[0] if w is not None else rows for w, rows in parts]
    up = torch.zeros(sum(sizes), down.shape[0], dtype=present[0].up.dtype)
    row, col = 0, 0
    for (weight, _), rows in zip(parts, sizes):
        if weight is not None:
            up[row : row + rows, col : col + weight.rank] = weight.up
            col += weight.rank
        row += rows
    if module.swap_halves:
        up = torch.cat(up.chunk(2)[::-1])
    alpha = present[0].alpha * len(present) if len(present) > 1 else present[0].alpha
    return {
        f"{module.key}.lora_down.weight": down.contiguous(),
        f"{module.key}.lora_up.weight": up.contiguous(),
        f"{module.key}.alpha": torch.tensor(float(alpha), dtype=torch.float32),
    }


def from_native(tensors: dict[str, torch.Tensor], layout: NativeLayout) -> LoraSet:
    """The transformer LoRAs of a kohya file in this layout, each fused module split into its parts."""
    modules = layout.by_key()
    stems = {k.rsplit(".lora_down.weight", 1)[0] for k in tensors if k.endswith(".lora_down.weight")}
    unknown = sorted(s for s in stems if s not in modules)
    if unknown:
        raise ModelError(f"{len(unknown)} LoRA module(s) are not in this model's layout, e.g. {unknown[:3]}")
    out: LoraSet = {}
    for stem in sorted(stems):
        module = modules[stem]
        down, up = tensors[f"{stem}.lora_down.weight"].float(), tensors[f"{stem}.lora_up.weight"].float()
        alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else float(down.shape[0])
        if module.swap_halves:
            up = torch.cat(up.chunk(2)[::-1])
        out.update(split(module, down, up, alpha))
    return out


def split(module: NativeModule, down: torch.Tensor, up: torch.Tensor, alpha: float) -> LoraSet:
    """Per part: rows of up. A block-diagonal up (what to_native writes, and sd-scripts' split_qkv) gives each
    part its own rank-r slice of down, over all parts or over the trained ones; any other file keeps the
    whole down for each part with nonzero rows, which is exact at the file's rank."""
    if len(module.parts) == 1:
        return {(COMPONENT, module.parts[0][0]): LoraWeight(down, up, alpha)}
    rows = [r for _, r in module.parts]
    if sum(rows) != up.shape[0]:
        raise ModelError(f"{module.key}: lora_up has {up.shape[0]} rows, the module {sum(rows)}")
    blocks, rank = up.split(rows), down.shape[0]
    trained = [i for i, b in enumerate(blocks) if b.abs().sum() > 0]
    for parts in (list(range(len(blocks))), trained):  # every part trained (some maybe to zero), or a subset
        if parts and rank % len(parts) == 0 and _block_diagonal(blocks, parts, rank // len(parts)):
            r = rank // len(parts)
            return {
                (COMPONENT, module.parts[i][0]): LoraWeight(
                    down[j * r : (j + 1) * r], blocks[i][:, j * r : (j + 1) * r], alpha * r / rank
                )
                for j, i in enumerate(parts)
            }
    return {(COMPONENT, module.parts[i][0]): LoraWeight(down, blocks[i], alpha) for i in trained}


def _block_diagonal(blocks, parts: list[int], r: int) -> bool:
    """Whether part parts[j]'s rows use only columns j*r..(j+1)*r (and other parts' rows are zero)."""
    for i, block in enumerate(blocks):
        j = parts.index(i) if i in parts else None
        outside = block if j is None else torch.cat([block[:, : j * r], block[:, (j + 1) * r :]], dim=1)
        if outside.numel() and outside.abs().sum() > 0:
            return False
    return True


def native_metadata(
    loras: LoraSet, family_keys: dict[str, str], training: dict[str, str], now: float | None = None
) -> dict[str, str]:
    """ss_* and modelspec.* keys as the kohya-style trainers write them (never lora_adapter_metadata, which
    would make diffusers read the file as its own)."""
    weights = list(loras.values())
    now = time.time() if now is None else now
    meta = {
        "ss_network_dim": str(Counter(w.rank for w in weights).most_common(1)[0][0]),
        "ss_network_alpha": f"{Counter(w.alpha for w in weights).most_common(1)[0][0]:g}",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        "modelspec.author": f"lora-operator {__version__}",
        **training,
        **family_keys,
    }
    meta.pop("modelspec.prediction_type", None)  # an SD notion (epsilon/v); flow models predict velocity
    return meta


def write_native_file(
    cfg,
    out: Path,
    weights: dict[str, torch.Tensor],
    meta: dict[str, str],
    layout: NativeLayout,
    family_keys: dict[str, str],
) -> list[tuple[Path, str]]:
    """<output_name>.kohya.safetensors of a diffusion-transformer run. Returns [(path, "kohya")]."""
    from ..checkpoint import save_safetensors
    from . import training_metadata

    loras = from_diffusers(weights, meta)
    path = out / kohya_name(cfg.output_name)
    save_safetensors(path, to_native(loras, layout), native_metadata(loras, family_keys, training_metadata(cfg)))
    return [(path, "kohya")]


def is_native(tensors: dict[str, Any]) -> bool:
    return any(k.startswith(KOHYA_PREFIX + "_") for k in tensors)


def linear_paths(model: torch.nn.Module) -> list[str]:
    """The paths of a model's Linear layers, as its original checkpoint names them where the layouts agree
    (peft's wrapper levels, base_layer and lora_A/B, left out)."""
    paths = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name:
            paths.append(name.removesuffix(".base_layer"))
    return list(dict.fromkeys(paths))


def identity_layout(paths: list[str], renames: dict[str, str] | None = None) -> NativeLayout:
    """A layout whose original names are the diffusers ones (Qwen-Image), save for `renames`."""
    renames = renames or {}
    return NativeLayout(tuple(NativeModule(renames.get(p, p), ((p, None),)) for p in paths))
