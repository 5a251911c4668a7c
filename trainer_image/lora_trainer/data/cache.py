"""VAE latents and text-encoder outputs cached on disk, keyed by content hash and reused across runs.

A key covers everything the cached tensor depends on (the image bytes, its crop and flip, the encoder's
weights), so a stale entry can never be served. Entries are safetensors files written atomically;
an unreadable one is recomputed. Latents are stored as the VAE's distribution parameters, so each step
still draws its own sample from the run's generator, exactly as without the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..checkpoint import read_safetensors_header, save_safetensors
from ..files import sha256_file

log = logging.getLogger("lora_trainer")

# Entries the training process has read stay in memory up to this many bytes: every epoch reads them again,
# and a file read per item was half of the data time of a small cached run. DataLoader workers keep none
# (they live one epoch and their reads overlap the steps).
MEMORY_BUDGET = 1 << 30


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a model's config and every weight: different weights, different cache entries."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        for part in stored_parts(tensor.detach()):
            t = part.cpu().contiguous()
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return digest.hexdigest()


def stored_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a weight is stored as: a quantized one (torchao's tensor subclasses) holds its data and
    scales as inner tensors."""
    if type(tensor) is torch.Tensor or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [part for name in names for part in stored_parts(getattr(tensor, name))]


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class TensorCache:
    """key -> {name: tensor}, one safetensors file per entry under root/<key[:2]>/<key>.safetensors."""

    def __init__(self, root: str | Path, memory_budget: int = MEMORY_BUDGET):
        self.root = Path(root)
        self.memory_budget = memory_budget
        self.kept: dict[str, dict[str, torch.Tensor]] = {}
        self.kept_bytes = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "kept": {}, "kept_bytes": 0}  # a spawned loader worker starts empty

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry (callers must not modify its tensors), or None if it is missing or unreadable."""
        if key in self.kept:
            return self.kept[key]
        entry = self.read(key)
        if entry is not None and torch.utils.data.get_worker_info() is None:
            size = sum(t.numel() * t.element_size() for t in entry.values())
            if self.kept_bytes + size <= self.memory_budget:
                self.kept[key], self.kept_bytes = entry, self.kept_bytes + size
        return entry

    def read(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        try:
            return load_file(path)
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError) as err:  # a torn or foreign file: recompute it
            log.warning("cache entry %s is unreadable (%s); recomputing it", path, err)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        save_safetensors(self.path(key), {k: v.detach().cpu().contiguous() for k, v in tensors.items()})

    def intact(self, key: str) -> bool:
        """Whether the entry exists and is as long as its header says: a cheap check that reads no tensor.
        A torn one is removed (and so computed again)."""
        path = self.path(key)
        try:
            with path.open("rb") as handle:
                raw = read_safetensors_header(handle)
            header = json.loads(raw)
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size == 8 + len(raw) + end:
                return True
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            log.warning("cache entry %s is unreadable (%s); recomputing it", path, err)
        else:
            log.warning("cache entry %s is shorter or longer than its header says; recomputing it", path)
        path.unlink(missing_ok=True)
        return False


def image_hashes(paths: list[Path]) -> list[str]:
    return [sha256_file(p) for p in paths]
