"""What the training loop needs from a task (text-to-image, text-generation), and shared helpers."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ..compat import PeftThrough
from ..config import TrainConfig
from ..errors import ModelError
from ..presets import is_preset, preset_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class DataReport:
    """What validating the dataset found: a summary for logs and EXPERIMENT.md, and warnings."""

    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Task(Protocol):
    """One kind of LoRA training. The recipe calls prepare_data (validation, before any model loads),
    load, dataset and collate, then loss once per micro-batch."""

    cfg: TrainConfig

    @staticmethod
    def library_needs(cfg: TrainConfig) -> list[PeftThrough]:
        """What the installed libraries must support for this config (compat.py); checked before any download."""

    def prepare_data(self, labeling: Callable[[int, int], None] | None = None) -> DataReport:
        """Reads and validates the data; `labeling(done, total)` hears auto_label's progress, if any."""

    def load(self, device: torch.device, weight_dtype: torch.dtype) -> None: ...

    def dataset(self) -> torch.utils.data.Dataset:
        """Items are fetched by (index, item_seed) keys from data.sampler.EpochBatches."""

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]: ...

    def item_groups(self) -> tuple[tuple[int, ...], ...]:
        """Dataset indices in groups that batches never mix (aspect-ratio buckets); one group if none."""

    def param_groups(self) -> list[dict[str, Any]]: ...

    def train_mode(self) -> None: ...

    def loss(self, batch: dict[str, torch.Tensor], rng: torch.Generator) -> torch.Tensor: ...

    def batch_counts(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(samples, tokens) in a micro-batch."""

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights with the keys of the final file (diffusers or peft format)."""

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def validate(self, step: int):
        """A ValidationResult (sample images or held-out loss), or None when none is configured."""

    def weights_metadata(self) -> dict[str, str]: ...

    def write_sidecars(self, folder: Path) -> list[Path]:
        """Extra files that make the output folder loadable (e.g. peft's adapter_config.json)."""


def resolve_local_model(cfg: TrainConfig) -> str:
    """A local folder or file for base_model, or a hub id; errors name what is missing."""
    name = cfg.base_model
    if is_preset(name):
        return str(preset_path(name))
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or name.endswith((".safetensors", ".ckpt")) or not HUB_ID.match(name):
        raise ModelError(f"base_model {name} does not exist")
    return name  # a hub id: loaded by from_pretrained when a hub is reachable


def load_or_explain(what: str, name: str, load: Callable[[], Any]) -> Any:
    """Runs a from_pretrained call, turning its many failure types into one clear ModelError."""
    try:
        return load()
    except (OSError, ValueError, KeyError, EnvironmentError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load {what} from base_model {name}: {first}") from None


def lora_param_groups(modules_and_lrs: list[tuple[torch.nn.Module, float]]) -> list[dict[str, Any]]:
    groups = []
    for module, lr in modules_and_lrs:
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr})
    if not groups:
        raise ModelError("no LoRA parameter is trainable: check target_modules against the model's module names")
    return groups


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_targets_exist(model: torch.nn.Module, targets: list[str], where: str) -> None:
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ModelError(f"target_modules {missing} match no module of the {where}; e.g. {_examples(names)}")


def _examples(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and "." in n})
    return ", ".join(leaves[:12])

