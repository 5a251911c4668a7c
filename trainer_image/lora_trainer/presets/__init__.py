"""Tiny model presets built locally from configs: `base_model: preset:tiny-sd`, `preset:tiny-llm`, ...

No model hub is needed: each preset is built once with a fixed seed into a cache folder, in the same
layout as a real model on disk (a diffusers or transformers folder), and then loaded through exactly the
same code path as a real model. Architectures match the real ones (SD 1.x UNet/VAE/CLIP, Llama, BLIP) at
widths of 32-64, so everything but the size is exercised. One module per model family builds its presets.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

PRESET_PREFIX = "preset:"
PRESET_VERSION = "2"  # bump when a builder changes, so caches rebuild

BUILDERS = {  # preset id -> "module:function" under lora_trainer.presets, imported on first use
    "tiny-sd": "sd:build_tiny_sd",
    "tiny-sdxl": "sd:build_tiny_sdxl",
    "tiny-llm": "llm:build_tiny_llm",
    "tiny-flux1": "flux:build_tiny_flux1",
    "tiny-sd3": "sd3:build_tiny_sd3",
    "tiny-qwen-image": "qwen:build_tiny_qwen_image",
    "tiny-z-image": "qwen:build_tiny_z_image",
    "tiny-flux2": "qwen:build_tiny_flux2_klein",
    "tiny-blip": "blip:build_tiny_blip",  # the captioner of lora-label and auto_label tests
    # real architectures with random weights, for benchmarks on a GPU (several GB on disk)
    "bench-sd15": "sd:build_bench_sd15",
    "bench-llama-1b": "llm:build_bench_llama_1b",
    "bench-llama-8b": "llm:build_bench_llama_8b",  # 16 GB of bf16 on disk: benchmarks/bench_llm.py --arch real
    "bench-flux1": "flux:build_bench_flux1",
}


def cache_root() -> Path:
    return Path(os.environ.get("LORA_CACHE_DIR", Path.home() / ".cache" / "lora-operator"))


def is_preset(name: str) -> bool:
    return name.startswith(PRESET_PREFIX)


def preset_path(name: str) -> Path:
    """The local folder of a preset, built on first use. `name` is 'preset:<id>'."""
    preset_id = name[len(PRESET_PREFIX) :]
    if preset_id not in BUILDERS:
        from ..errors import ModelError

        raise ModelError(f"unknown preset {name!r}; available: {', '.join(PRESET_PREFIX + p for p in BUILDERS)}")
    target = cache_root() / "presets" / f"{preset_id}-v{PRESET_VERSION}"
    if not (target / ".complete").exists():
        if _in_process_group():
            _build_in_subprocess(name, preset_id, target)
        else:
            _build_atomically(builder(preset_id), target)
    return target


def _in_process_group() -> bool:
    """Whether this process is a worker of an initialised torch.distributed group (torch already imported)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _build_in_subprocess(name: str, preset_id: str, target: Path) -> None:
    """Build in a fresh Python process, outside the process group: transformers' save_pretrained writes
    weights only on global rank 0 once torch.distributed is initialised, so on a node without rank 0 a
    preset built in-process got configs but no weights (an empty text_encoder/, a Llama without
    model.safetensors). The child takes the same lock; its output is kept for the error message."""
    code = (
        "import sys; from lora_trainer import presets as p; "
        "p._build_atomically(p.builder(sys.argv[1]), p.Path(sys.argv[2]))"
    )
    done = subprocess.run([sys.executable, "-c", code, preset_id, str(target)], capture_output=True, text=True)
    if done.returncode != 0 or not (target / ".complete").exists():
        from ..errors import ModelError

        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ModelError(f"building {name} failed (exit {done.returncode}): " + " | ".join(tail))


def builder(preset_id: str) -> Callable[[Path], None]:
    module, function = BUILDERS[preset_id].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def _build_atomically(build: Callable[[Path], None], target: Path) -> None:
    """Builds into a temp folder and renames it into place, one process at a time: the processes of a
    distributed run resolve the base model together, and without the lock one's clean-up of a leftover
    could delete files of the preset another had just renamed into place (a complete marker over an empty
    text_encoder/). A process that finds the preset complete once it holds the lock keeps it.
    The builders seed torch for their random weights; fork_rng keeps that from reaching the caller, whose
    LoRA init would otherwise depend on whether the preset was already on disk."""
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (target / ".complete").exists():
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            with torch.random.fork_rng(devices=[]):
                build(tmp)
            (tmp / ".complete").write_text(PRESET_VERSION)
            if target.exists():  # an incomplete leftover of a process that died while building
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
