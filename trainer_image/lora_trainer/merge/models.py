"""Merging LoRAs into their base model and saving it: Stable Diffusion (diffusers folder or one LDM
.safetensors file, as A1111/ComfyUI load checkpoints) and causal LLMs (a transformers folder)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import sort_safetensors_metadata
from ..errors import ConfigError, ModelError
from ..files import atomic_write, sha256_file
from ..formats import PEFT_COMPONENT, read_lora
from ..formats.ldm import ldm_checkpoint
from ..formats.lora import only
from ..presets import is_preset, preset_path
from .apply import apply_loras

log = logging.getLogger("lora_trainer")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MERGE_RECORD = "lora_merge.json"


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float


def parse_lora_spec(text: str) -> LoraSpec:
    """'a.safetensors:0.8' -> (a.safetensors, 0.8); no ':<number>' suffix means scale 1."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return LoraSpec(Path(path), float(scale))
        except ValueError:
            pass
    return LoraSpec(Path(text), 1.0)


def resolve_base(base: str) -> Path:
    path = preset_path(base) if is_preset(base) else Path(base).expanduser()
    if not path.exists():
        raise ModelError(f"base model {base} does not exist (a local folder, .safetensors file or preset:<name>)")
    return path


def base_kind(path: Path) -> str:
    """'pipeline' for a diffusers pipeline folder (any model family) or a single .safetensors checkpoint, 'llm'
    for a transformers folder."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelError(f"{path}: single-file checkpoints are read only as .safetensors (nothing is unpickled)")
        return "pipeline"
    if (path / "model_index.json").is_file():
        return "pipeline"
    if (path / "config.json").is_file():
        return "llm"
    raise ModelError(
        f"{path} is neither a diffusers pipeline (model_index.json) nor a transformers model (config.json)"
    )


def merge_record(base: str, specs: list[LoraSpec]) -> dict[str, Any]:
    """What was merged, so a merged model can always be traced to its LoRA files."""
    return {
        "base_model": base,
        "loras": [{"file": str(s.path), "scale": s.scale, "sha256": sha256_file(_weights_file(s.path))} for s in specs],
    }


def _weights_file(path: Path) -> Path:
    return path / "adapter_model.safetensors" if path.is_dir() else path


# -- Stable Diffusion
def load_sd(path: Path, base_config: str | None):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    try:
        if path.is_file():
            if not base_config:
                raise ConfigError("a single-file base model needs --base-config: a diffusers folder with its configs")
            config = str(resolve_base(base_config))
            return StableDiffusionPipeline.from_single_file(str(path), config=config, local_files_only=True)
        return DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"cannot load the base model {path}: {str(err).splitlines()[0] if str(err) else err}"
        ) from None


PIPELINE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def sd_components(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in PIPELINE_COMPONENTS if getattr(pipe, name, None) is not None}


def native_layout(pipe):
    """The original checkpoint layout of a diffusion transformer's kohya files (None for UNet pipelines)."""
    from ..families import BY_PIPELINE, family_class

    name = BY_PIPELINE.get(type(pipe).__name__)
    return family_class(name).native_layout(pipe.transformer) if name and getattr(pipe, "transformer", None) else None


def merge_into_sd(pipe, specs: list[LoraSpec]) -> None:
    modules = sd_components(pipe)
    unet_config = dict(pipe.unet.config) if getattr(pipe, "unet", None) is not None else None
    layout = native_layout(pipe)
    for spec in specs:
        lora_file = read_lora(spec.path, unet_config, layout)
        if lora_file.format == "peft":
            raise ModelError(
                f"{spec.path} is a peft (LLM) adapter; a Stable Diffusion base takes diffusers or kohya LoRA files"
            )
        lora = lora_file.loras
        unknown = sorted({c for c, _ in lora} - set(modules))
        if unknown:
            raise ModelError(f"{spec.path} adapts {', '.join(unknown)}, which this pipeline does not have")
        for component, module in modules.items():
            changed = apply_loras(module, only(lora, component), spec.scale)
            if changed:
                log.info("%s: merged %d %s modules at scale %g", spec.path.name, changed, component, spec.scale)


def save_sd(pipe, output: Path, dtype: torch.dtype, record: dict[str, Any]) -> Path:
    """A diffusers folder, or (output ending in .safetensors) one SD 1.x or SDXL checkpoint in the LDM layout."""
    if output.suffix == ".safetensors":
        return save_single_file(pipe, output, dtype, record)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(str(output), safe_serialization=True)
    atomic_write(output / MERGE_RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return output


def save_single_file(pipe, output: Path, dtype: torch.dtype, record: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    if getattr(pipe, "unet", None) is None:
        raise ModelError(
            f"single-file output is written for SD 1.x and SDXL; a {type(pipe).__name__} is saved as "
            "a diffusers folder: give --output a folder name"
        )
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    if len(encoders) == 1 and pipe.text_encoder.config.hidden_act != "quick_gelu":
        raise ModelError(
            "single-file output is written for SD 1.x and SDXL; SD 2.x (an OpenCLIP ViT-H text "
            "encoder alone) is saved as a diffusers folder instead"
        )

    def state(module) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) for k, v in module.state_dict().items()}

    tensors = ldm_checkpoint(
        state(pipe.unet), state(pipe.vae), [state(e) for e in encoders], dict(pipe.unet.config), dict(pipe.vae.config)
    )
    metadata = {"format": "pt", "lora_merge": json.dumps(record)}
    atomic_write(output, lambda tmp: (save_file(tensors, str(tmp), metadata), sort_safetensors_metadata(tmp)))
    return output


# -- LLMs
def load_llm(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
            f"cannot load the base model {path}: {str(err).splitlines()[0] if str(err) else err}"
        ) from None
    return model, tokenizer


def merge_into_llm(model: torch.nn.Module, specs: list[LoraSpec]) -> None:
    for spec in specs:
        lora = read_lora(spec.path)
        if lora.format != "peft":
            raise ModelError(f"{spec.path} is a {lora.format} LoRA; an LLM takes a peft adapter (folder or file)")
        changed = apply_loras(model, only(lora.loras, PEFT_COMPONENT), spec.scale)
        log.info("%s: merged %d modules at scale %g", spec.path.name, changed, spec.scale)


def save_llm(model, tokenizer, output: Path, dtype: torch.dtype, record: dict[str, Any]) -> Path:
    if output.suffix == ".safetensors":
        raise ModelError("an LLM is saved as a transformers folder; give --output a folder name")
    model.to(dtype=dtype).save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))
    atomic_write(output / MERGE_RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return output


def merge(base: str, specs: list[LoraSpec], output: Path, dtype: str = "fp32", base_config: str | None = None) -> Path:
    """Loads `base`, adds every LoRA at its scale, saves to `output`. With no LoRA it converts the base
    model (e.g. a diffusers folder into a single-file checkpoint)."""
    path = resolve_base(base)
    if output.exists() and (output.is_file() or any(output.iterdir())):
        raise ConfigError(f"output {output} already exists; choose a new path")
    record = merge_record(base, specs)
    if base_kind(path) == "pipeline":
        pipe = load_sd(path, base_config)
        merge_into_sd(pipe, specs)
        return save_sd(pipe, output, DTYPES[dtype], record)
    model, tokenizer = load_llm(path)
    merge_into_llm(model, specs)
    return save_llm(model, tokenizer, output, DTYPES[dtype], record)
