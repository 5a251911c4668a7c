"""What the training loop needs from a task (text-to-image, text-generation), and shared helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..compat import Need
from ..config import TrainConfig
from ..distributed import BatchRandom


@dataclass
class DataReport:
    """What validating the dataset found: a summary for logs and EXPERIMENT.md, and warnings."""

    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Task(Protocol):
    """One kind of LoRA training. The recipe calls prepare_data (validation, before any model loads),
    load, dataset and collate, then loss once per micro-batch."""

    cfg: TrainConfig
    weights_format: str  # the format of the final weights: "diffusers" or "peft"

    @staticmethod
    def library_needs(cfg: TrainConfig) -> list[Need]:
        """What the installed libraries (and the device) must support for this config (compat.py); checked
        before any download."""

    def prepare_data(self, labeling: Callable[[int, int], None] | None = None) -> DataReport:
        """Reads and validates the data; `labeling(done, total)` hears auto_label's progress, if any."""

    def load(self, device: torch.device, weight_dtype: torch.dtype, blocks_on_host: bool = False) -> None:
        """Loads the models onto `device`; with blocks_on_host the frozen_blocks() stay in host memory, for
        distributed_strategy fsdp to move each one's shard to the device (a base bigger than one GPU never
        lands whole on one)."""

    def dataset(self) -> torch.utils.data.Dataset:
        """Items are fetched by (index, item_seed) keys from data.sampler.EpochBatches."""

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]: ...

    def item_groups(self) -> tuple[tuple[int, ...], ...]:
        """Dataset indices in groups that batches never mix (aspect-ratio buckets); one group if none."""

    def param_groups(self) -> list[dict[str, Any]]: ...

    def frozen_blocks(self) -> list[torch.nn.Module]:
        """The loaded base's repeated blocks (decoder layers, the denoiser's blocks): what
        distributed_strategy fsdp shards over the processes."""

    def train_mode(self) -> None: ...

    def loss(self, batch: dict[str, torch.Tensor], draws: BatchRandom) -> torch.Tensor:
        """The mean loss of the micro-batch; its random draws come from `draws` (distributed.py)."""

    def item_weights(self) -> list[float]:
        """How much each dataset item counts in the mean loss of a batch (1 per image, its trained tokens for
        text): a process's share of a global batch is the sum of its items' weights."""

    def batch_counts(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(samples, tokens) in a micro-batch."""

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights with the keys of the final file (diffusers or peft format)."""

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def validate(self, step: int):
        """A ValidationResult (sample images or held-out loss), or None when none is configured."""

    def weights_metadata(self) -> dict[str, str]: ...

    def final_files(
        self, out: Path, final_checkpoint: Path, weights: dict[str, torch.Tensor], meta: dict[str, str]
    ) -> list[tuple[Path, str]]:
        """Files beside the main weights, as (path, format): what makes the folder loadable (peft's
        adapter_config.json) and the other formats asked for (kohya); written before the main file."""
