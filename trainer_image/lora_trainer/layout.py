"""The output layout: the names and patterns of what a run writes into output_dir (docs/architecture.md,
"Output layout"). The one home of these names; torch-free, so storage code and tools read it cheaply.

    .lora-owner.json                         the owner marker (ownership.py), written first
    pytorch_lora_weights.safetensors         FINAL_WEIGHTS, written last: its presence marks a finished run
    <output_name>.kohya.safetensors          kohya_name()
    adapter_config.json, adapter_model.safetensors   PEFT_CONFIG, PEFT_WEIGHTS (text generation)
    config_backup.yaml, EXPERIMENT.md, loss_curve.png, metadata.csv
    logs/                                    TensorBoard (the default logging_dir)
    samples/step_<N>_<i>.png                 sample_name()
    checkpoints/pytorch_lora_weights_step_<N>.safetensors   weights_name()
    checkpoints/pytorch_lora_weights_final.safetensors
    checkpoints/state_step_<N>/...manifest.json   state_dir_name(); the manifest is written last
"""

from __future__ import annotations

import re

FINAL_WEIGHTS = "pytorch_lora_weights.safetensors"
CONFIG_BACKUP = "config_backup.yaml"
EXPERIMENT_RECORD = "EXPERIMENT.md"
LOSS_CURVE = "loss_curve.png"
CAPTIONS = "metadata.csv"  # auto_label's captions, when the dataset folder is not to be written
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
LOGS = "logs"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
FINAL_CHECKPOINT = "pytorch_lora_weights_final.safetensors"
MANIFEST = "manifest.json"  # last file of a checkpoint: without it, the checkpoint is incomplete

STATE_FILES = ("optimizer.safetensors", "rng.safetensors", "state.json")  # besides the manifest
SHA256 = re.compile(r"^[0-9a-f]{64}$")

STATE_DIR = re.compile(r"^state_step_(\d+)$")
STEP_WEIGHTS = re.compile(r"^pytorch_lora_weights_step_(\d+)\.safetensors$")


def weights_name(step: int) -> str:
    return f"pytorch_lora_weights_step_{step}.safetensors"


def state_dir_name(step: int) -> str:
    return f"state_step_{step}"


def kohya_name(output_name: str) -> str:
    return f"{output_name}.kohya.safetensors"


def sample_name(step: int, index: int) -> str:
    return f"step_{step}_{index}.png"


def checkpoint_step(relative: str) -> int | None:
    """The step of a step checkpoint's file, for a path relative to output_dir
    ('checkpoints/state_step_4/optimizer.safetensors' -> 4); None for every other file."""
    parts = relative.split("/")
    if len(parts) < 2 or parts[0] != CHECKPOINTS:
        return None
    match = (STATE_DIR if len(parts) > 2 else STEP_WEIGHTS).match(parts[1])
    return int(match.group(1)) if match else None


def checkpoint_files(step: int) -> list[str]:
    """The files of checkpoint `step` that its manifest lists, relative to checkpoints/."""
    return [weights_name(step), *(f"{state_dir_name(step)}/{name}" for name in STATE_FILES)]


def manifest_problem(manifest: object, step: int) -> str | None:
    """Why `manifest` (parsed manifest.json) is not checkpoint `step`'s, or None. A manifest names exactly
    the checkpoint's files, each with its size and SHA-256: a hostile one cannot point a resume elsewhere."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return "its manifest.json is not a checkpoint manifest"
    listed, expected = set(manifest["files"]), set(checkpoint_files(step))
    if listed != expected:
        odd = sorted(listed ^ expected)[:3]
        return f"its manifest.json lists other files than checkpoint {step} has ({', '.join(map(repr, odd))})"
    for name, info in manifest["files"].items():
        size, digest = (info.get("size"), info.get("sha256")) if isinstance(info, dict) else (None, None)
        if type(size) is not int or size < 0 or not isinstance(digest, str) or not SHA256.match(digest):
            return f"its manifest.json has no valid size and sha256 for {name}"
    return None
