"""Whether the installed libraries can do what a config asks, checked before anything is downloaded or loaded.

The tested set of versions is uv.lock (docs/dependencies.md). People who install the package into their own
environment get pyproject.toml's ranges, and libraries move: a new transformers may need a newer peft than
the one installed. Each library declares what it needs in its own code; we read that declaration instead of
copying version numbers here, so the check stays right when the libraries move.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Protocol

from .errors import ConfigError


class Need(Protocol):
    """Something a config asks of the installed libraries (and the device): PeftThrough and
    CompilerForTorchCompile below, or quantization.QuantizedBase."""

    def problem(self) -> str | None:
        """Why it cannot be met, in words that name the config key and the fix; None when it can."""


@dataclass(frozen=True)
class PeftThrough:
    """A config feature that makes `library` add LoRA layers with peft. `declared_at` names the constant in
    which that library declares the oldest peft it works with ("module:NAME")."""

    feature: str  # what the config asked, as the user wrote it: "train_text_encoder: true"
    library: str
    declared_at: str

    def problem(self) -> str | None:
        from packaging.version import Version

        module, name = self.declared_at.split(":")
        needed = getattr(importlib.import_module(module), name, None)  # absent: the library declares nothing
        installed = installed_version("peft")
        if needed is None or (installed is not None and Version(installed) >= Version(needed)):
            return None
        have = f"peft {installed} is installed" if installed else "peft is not installed"
        return (
            f"{self.feature} adds LoRA layers through {self.library} {installed_version(self.library)}, which "
            f"needs peft>={needed}, but {have}. Install the tested versions (scripts/setup.sh installs "
            f"uv.lock) or `pip install 'peft>={needed}'`"
        )


@dataclass(frozen=True)
class CompilerForTorchCompile:
    """torch_compile on CPU: inductor writes C++ and builds it with the compiler torch finds (CXX, else g++).
    Without one, the first training step would fail deep in torch; the run is refused at start instead."""

    device: str  # the config's device: auto, cpu or cuda

    def problem(self) -> str | None:
        import torch

        if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()):
            return None  # CUDA kernels are Triton's; checked by torch when it compiles
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as err:  # noqa: BLE001 - whatever torch's own search raises is the answer
            return (
                f"torch_compile: true on cpu needs a C++ compiler and torch {installed_version('torch')} found none "
                f"({type(err).__name__}): install g++ (or set CXX to a C++ compiler) or set torch_compile: false"
            )
        return None


@dataclass(frozen=True)
class FullyShard:
    """distributed_strategy: fsdp shards with FSDP2's fully_shard, keeping the LoRA weights out of the shards
    with its `ignored_params` (newer than the oldest torch pyproject.toml allows); an older torch is refused at
    start."""

    def problem(self) -> str | None:
        import inspect

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            fully_shard = None
        if fully_shard is not None and "ignored_params" in inspect.signature(fully_shard).parameters:
            return None
        return (
            f"distributed_strategy: fsdp needs FSDP2's fully_shard with ignored_params, which torch "
            f"{installed_version('torch')} lacks: install the tested versions (uv.lock) or use distributed_strategy: ddp"
        )


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_libraries(needs: list[Need]) -> None:
    """Raises a ConfigError (exit 2: permanent, retrying cannot help) naming every unmet need."""
    problems = [p for p in (need.problem() for need in needs) if p]
    if problems:
        raise ConfigError("the installed libraries cannot run this config: " + "; ".join(problems))
