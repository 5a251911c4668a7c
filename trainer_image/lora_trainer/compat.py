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

from .errors import ConfigError


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


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_libraries(needs: list[PeftThrough]) -> None:
    """Raises a ConfigError (exit 2: permanent, retrying cannot help) naming every unmet need."""
    problems = [p for p in (need.problem() for need in needs) if p]
    if problems:
        raise ConfigError("the installed libraries cannot run this config: " + "; ".join(problems))
