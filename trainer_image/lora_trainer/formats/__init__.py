"""LoRA file formats: diffusers (this trainer's main file), kohya/A1111/ComfyUI, peft (LLM adapters).

read_lora(path)                         -> LoraFile (weights in one form, whatever the format)
write_lora(path, lora, "kohya")         writes it in a format
write_kohya_file(cfg, out, weights, ...) the kohya file a finished Stable Diffusion run writes
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..layout import kohya_name
from .kohya import from_kohya, is_kohya, kohya_metadata, to_kohya
from .lora import LoraSet, LoraWeight, from_diffusers, to_diffusers
from .native import from_native

log = logging.getLogger("lora_trainer")

FORMATS = ("diffusers", "kohya")
PEFT_PREFIX = "base_model.model."
PEFT_COMPONENT = "model"  # LLM adapters adapt one model; its modules are stored under this component


@dataclass
class LoraFile:
    loras: LoraSet
    metadata: dict[str, str]
    format: str  # diffusers, kohya or peft


def detect_format(tensors: Mapping[str, Any]) -> str:
    if is_kohya(tensors):
        return "kohya"
    if tensors and all(k.startswith(PEFT_PREFIX) for k in tensors):
        return "peft"
    return "diffusers"


def from_peft(tensors: dict[str, torch.Tensor], config: Mapping[str, Any]) -> LoraSet:
    """peft adapter keys 'base_model.model.<path>.lora_A.weight'; alpha from the adapter config.
    rsLoRA scales by alpha/sqrt(r): stored here as the alpha that gives that scale with alpha/r."""
    alpha, rank = float(config.get("lora_alpha", 8)), int(config.get("r", 8))  # peft's LoraConfig defaults
    alpha_pattern, rank_pattern = config.get("alpha_pattern") or {}, config.get("rank_pattern") or {}
    out: LoraSet = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ModelError(f"unsupported peft adapter key {key} (only LoRA A/B weights can be merged)")
            continue
        path = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
        down, up = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
        a = float(_pattern_value(alpha_pattern, path, alpha))
        r = int(_pattern_value(rank_pattern, path, rank))
        if config.get("use_rslora"):
            a = a * math.sqrt(r)  # a/sqrt(r) == (a*sqrt(r))/r
        out[(PEFT_COMPONENT, path)] = LoraWeight(down, up, a)
    if not out:
        raise ModelError("the adapter holds no LoRA weights")
    return out


def _pattern_value(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    """peft's rank/alpha patterns: a key matches a module whose path ends with it."""
    for key, value in pattern.items():
        if path == key or path.endswith("." + key):
            return value
    return default


def read_lora(path: str | Path, unet_config: Mapping[str, Any] | None = None, native_layout=None) -> LoraFile:
    """A .safetensors LoRA file in any supported format, or a peft adapter folder. kohya files of a diffusion
    transformer are read in its original checkpoint layout (`native_layout`, formats/native.py)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    config: dict[str, Any] = {}
    if path.is_dir():
        config_path = path / "adapter_config.json"
        if not config_path.is_file():
            raise ModelError(f"{path} is a folder without adapter_config.json (not a peft adapter)")
        config = json.loads(config_path.read_text())
        path = path / "adapter_model.safetensors"
    if path.suffix != ".safetensors" or not path.is_file():
        raise ModelError(f"{path}: LoRA files are read only as .safetensors (nothing is unpickled)")
    try:
        with safe_open(str(path), "pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open is not iterable
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ModelError(f"{path} cannot be read as safetensors: {err}") from None
    fmt = detect_format(tensors)
    if fmt == "kohya" and native_layout is not None:
        return LoraFile(from_native(tensors, native_layout), metadata, fmt)
    if fmt == "kohya":
        return LoraFile(from_kohya(tensors, unet_config), metadata, fmt)
    if fmt == "peft":
        if not config and "alpha" in metadata:  # this trainer's pytorch_lora_weights.safetensors for LLMs
            config = {"lora_alpha": float(metadata["alpha"]), "r": int(metadata.get("rank", 8))}  # peft's default r
        if not config:
            config = _sibling_adapter_config(path)
        return LoraFile(from_peft(tensors, config), metadata, fmt)
    return LoraFile(from_diffusers(tensors, metadata), metadata, fmt)


def _sibling_adapter_config(path: Path) -> dict[str, Any]:
    sibling = path.parent / "adapter_config.json"
    if not sibling.is_file():
        raise ModelError(f"{path}: a peft adapter needs its adapter_config.json (for lora_alpha) beside it")
    return json.loads(sibling.read_text())


def encode(
    lora: LoraFile, fmt: str, unet_config: Mapping[str, Any] | None = None, training: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of `lora` in format `fmt`."""
    if fmt == "kohya":
        return to_kohya(lora.loras, unet_config), kohya_metadata(lora.loras, lora.metadata, training)
    if fmt == "diffusers":
        return to_diffusers(lora.loras, lora.metadata)
    raise ModelError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")


def write_lora(
    path: str | Path,
    lora: LoraFile,
    fmt: str,
    unet_config: Mapping[str, Any] | None = None,
    training: Mapping[str, str] | None = None,
) -> Path:
    from ..checkpoint import save_safetensors

    tensors, metadata = encode(lora, fmt, unet_config, training)
    save_safetensors(Path(path), tensors, metadata)
    return Path(path)


def training_metadata(cfg) -> dict[str, str]:
    """The ss_* training keys kohya's trainers write, from this run's config."""
    values = {
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.text_encoder_lr if cfg.train_text_encoder else None,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_max_train_steps": cfg.max_train_steps,
        "ss_num_epochs": cfg.epochs,
        "ss_batch_size_per_device": cfg.batch_size,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": cfg.seed,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_noise_offset": cfg.noise_offset or None,
        "ss_min_snr_gamma": cfg.snr_gamma,
        "ss_network_dropout": cfg.lora_dropout,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_network_train_unet_only": not cfg.train_text_encoder,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": "v" if cfg.prediction_type == "v_prediction" else "epsilon",
        "modelspec.title": cfg.output_name,
        "modelspec.description": cfg.description,
        "ss_training_comment": cfg.description,
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def write_kohya_file(
    cfg, out: Path, weights: dict[str, torch.Tensor], meta: dict[str, str], unet_config: Mapping[str, Any] | None
) -> list[tuple[Path, str]]:
    """<output_name>.kohya.safetensors of a Stable Diffusion run: the run's diffusers weights in kohya's keys
    (LDM UNet names where `unet_config` is given, as kohya writes SDXL). Returns [(path, "kohya")]."""
    lora = LoraFile(from_diffusers(weights, meta), dict(meta), "diffusers")
    return [
        (
            write_lora(out / kohya_name(cfg.output_name), lora, "kohya", unet_config, training=training_metadata(cfg)),
            "kohya",
        )
    ]
