"""Checkpoints for exact resume, stored as safetensors + JSON only (nothing is ever unpickled).

    checkpoints/pytorch_lora_weights_step_<N>.safetensors   LoRA weights (loads in diffusers/peft)
    checkpoints/state_step_<N>/optimizer.safetensors        optimizer tensors
    checkpoints/state_step_<N>/rng.safetensors              RNG states (torch, CUDA, the loop's generator)
    checkpoints/state_step_<N>/state.json                   step, data position, scheduler, tensor-free state
    checkpoints/state_step_<N>/manifest.json                written last: the checkpoint is complete

Nested state (optimizer and scheduler state dicts, RNG tuples) is split into a JSON tree that refers to
tensors by name, so arbitrary state round-trips exactly.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import ConfigError
from .files import atomic_write, sha256_file
from .layout import CHECKPOINTS, MANIFEST, STATE_DIR, manifest_problem, state_dir_name, weights_name
from .redaction import redact

FORMAT_VERSION = 1


# -- nested state <-> (JSON tree, named tensors)
def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [flatten(k, tensors, f"{path}.k{i}"), flatten(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path}")


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return tensors[tree["__ndarray__"]].numpy()
    if "__tuple__" in tree:
        return tuple(unflatten(v, tensors) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in tree["__items__"]}
    return {k: unflatten(v, tensors) for k, v in tree.items()}


# -- atomic files
def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """LoRA-sized files: serialized in memory and written by Python, so a full disk raises OSError
    (safetensors' own writer reports it as a SafetensorError string)."""
    metadata = {k: redact(v) for k, v in metadata.items()} if metadata else metadata  # user text: no secrets
    data = canonical_safetensors(save(tensors, metadata=metadata))
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its metadata keys sorted: safetensors writes them in hash-map order, so the same
    weights would otherwise give different bytes (and checksums) from run to run."""
    raw = read_safetensors_header(io.BytesIO(data))
    header = _sorted_header(raw)
    return len(header).to_bytes(8, "little") + header + data[8 + len(raw) :]


def sort_safetensors_metadata(path: Path) -> None:
    """canonical_safetensors for a file on disk (too big to hold twice in memory), rewriting its header only."""
    with path.open("r+b") as handle:
        raw = read_safetensors_header(handle)
        header = _sorted_header(raw)
        if len(header) == len(raw):  # the same compact JSON reordered: same length
            handle.seek(8)
            handle.write(header)


def read_safetensors_header(handle: BinaryIO) -> bytes:
    """The JSON header of a safetensors file (it follows the header's length, 8 bytes little-endian)."""
    size = int.from_bytes(handle.read(8), "little")
    return handle.read(size)


def _sorted_header(header: bytes) -> bytes:
    parsed = json.loads(header)
    if "__metadata__" in parsed:
        parsed["__metadata__"] = dict(sorted(parsed["__metadata__"].items()))
    text = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it


def save_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


# -- checkpoints
@dataclass(frozen=True)
class Checkpoint:
    step: int
    state_dir: Path
    weights: Path


@dataclass
class CheckpointState:
    """What a resume restores besides the LoRA weights."""

    trainer: dict[str, Any]  # step, epoch, step_in_epoch, losses, ...
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    scaler: dict[str, Any] | None = None


def save_checkpoint(
    root: Path, step: int, weights: dict[str, torch.Tensor], weights_metadata: dict[str, str], state: CheckpointState
) -> Checkpoint:
    folder = root / CHECKPOINTS
    ckpt = Checkpoint(step, folder / state_dir_name(step), folder / weights_name(step))
    if ckpt.state_dir.exists():  # an incomplete leftover of a crashed save of this same step
        shutil.rmtree(ckpt.state_dir)
    save_safetensors(ckpt.weights, weights, weights_metadata)
    optimizer_tensors: dict[str, torch.Tensor] = {}
    rng_tensors: dict[str, torch.Tensor] = {}
    tree = {
        "format_version": FORMAT_VERSION,
        "trainer": state.trainer,
        "optimizer": flatten(state.optimizer, optimizer_tensors, "optimizer"),
        "scheduler": flatten(state.scheduler, optimizer_tensors, "scheduler"),
        "scaler": flatten(state.scaler, optimizer_tensors, "scaler"),
        "rng": flatten(state.rng, rng_tensors, "rng"),
    }
    save_safetensors(ckpt.state_dir / "optimizer.safetensors", optimizer_tensors)
    save_safetensors(ckpt.state_dir / "rng.safetensors", rng_tensors)
    save_json(ckpt.state_dir / "state.json", tree)
    files = [ckpt.weights, *(ckpt.state_dir / n for n in ("optimizer.safetensors", "rng.safetensors", "state.json"))]
    manifest = {
        "step": step,
        "files": {os.path.relpath(f, folder): {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in files},
    }
    save_json(ckpt.state_dir / MANIFEST, manifest)  # last: now the checkpoint is complete
    return ckpt


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: incomplete, corrupt, or written by another format."""


def checkpoint_problem(state_dir: Path, verify: bool = False) -> str | None:
    """Why the checkpoint in state_dir cannot be resumed from, or None. Without `verify` only the manifest
    and the files' sizes are checked (cheap: for listing); with it, every file's SHA-256 too."""
    step = int(STATE_DIR.match(state_dir.name).group(1))
    try:
        manifest = json.loads((state_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return "it has no manifest.json (an incomplete save)"
    except (OSError, ValueError) as err:
        return f"its manifest.json cannot be read: {err}"
    problem = manifest_problem(manifest, step)
    if problem:
        return problem
    for rel, info in manifest["files"].items():
        path = state_dir.parent / rel
        if not path.is_file() or path.stat().st_size != info["size"]:
            return f"{rel} is missing or has the wrong size"
        if verify and sha256_file(path) != info["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def is_complete(state_dir: Path, verify: bool = False) -> bool:
    return checkpoint_problem(state_dir, verify) is None


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints under root/checkpoints, oldest first."""
    folder = root / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = STATE_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            step = int(match.group(1))
            found.append(Checkpoint(step, child, folder / weights_name(step)))
    return sorted(found, key=lambda c: c.step)


Loaded = tuple[Checkpoint, dict[str, torch.Tensor], CheckpointState]


def load_resume_point(root: Path, resume: str) -> tuple[Loaded | None, list[str]]:
    """(checkpoint, weights, state) to resume from, and why newer checkpoints were passed over.

    'latest': the newest checkpoint that is complete and valid, falling back to older ones (None when
    there is none); a folder: that checkpoint, or CheckpointError."""
    if resume != "latest":
        return load_checkpoint(named_checkpoint(resume)), []
    passed_over = []
    for ckpt in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(ckpt), passed_over
        except CheckpointError as err:
            passed_over.append(f"{err}; resuming from an older checkpoint")
    return None, passed_over


def named_checkpoint(resume: str) -> Checkpoint:
    state_dir = Path(resume)
    match = STATE_DIR.match(state_dir.name)
    if not match or not state_dir.is_dir():
        raise ConfigError(f"resume: {resume} is not a checkpoints/state_step_<N> folder")
    step = int(match.group(1))
    return Checkpoint(step, state_dir, state_dir.parent / weights_name(step))


def load_checkpoint(ckpt: Checkpoint) -> Loaded:
    problem = checkpoint_problem(ckpt.state_dir, verify=True)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt.state_dir} is incomplete or corrupt: {problem}")
    try:
        tree = json.loads((ckpt.state_dir / "state.json").read_text())
        if tree.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {ckpt.state_dir} has format {tree.get('format_version')}, expected {FORMAT_VERSION}"
            )
        tensors = {
            **load_file(ckpt.state_dir / "optimizer.safetensors"),
            **load_file(ckpt.state_dir / "rng.safetensors"),
        }
        state = CheckpointState(
            trainer=tree["trainer"],
            optimizer=unflatten(tree["optimizer"], tensors),
            scheduler=unflatten(tree["scheduler"], tensors),
            rng=unflatten(tree["rng"], tensors),
            scaler=unflatten(tree["scaler"], tensors),
        )
        return ckpt, load_file(ckpt.weights), state
    except (ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {ckpt.state_dir} cannot be read: {type(err).__name__}: {err}") from None


def prune_checkpoints(root: Path, keep: int | None) -> list[int]:
    """Deletes all but the newest `keep` complete checkpoints, and incomplete ones older than those kept."""
    complete = list_checkpoints(root)
    doomed = complete[:-keep] if keep else []
    newest = complete[-1].step if complete else -1
    folder = root / CHECKPOINTS
    for child in folder.iterdir() if folder.is_dir() else []:
        match = STATE_DIR.match(child.name)
        if match and int(match.group(1)) < newest and not is_complete(child):
            step = int(match.group(1))
            doomed.append(Checkpoint(step, child, folder / weights_name(step)))
    for ckpt in doomed:
        (ckpt.state_dir / MANIFEST).unlink(missing_ok=True)  # incomplete first, so a crash leaves no half
        shutil.rmtree(ckpt.state_dir, ignore_errors=True)
        ckpt.weights.unlink(missing_ok=True)
    return sorted(c.step for c in doomed)
