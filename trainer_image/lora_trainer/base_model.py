"""Where a base model lives (a preset, a local folder or single file, a hub id) and one clear ModelError
for the many ways loading it can fail."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import ConfigError, ModelError
from .presets import is_preset, preset_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name" or "name", as the hub spells repo ids


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
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load {what} from base_model {name}: {first}") from None


def config_source(cfg: TrainConfig) -> str:
    """Where the pipeline's configs live: the model folder, or base_model_config for a single file."""
    source = resolve_local_model(cfg)
    if Path(source).is_file():
        if not source.endswith(".safetensors"):
            raise ModelError(f"base_model {source}: single-file checkpoints must be .safetensors (never unpickled)")
        if not cfg.base_model_config:
            raise ConfigError("a single-file base_model needs base_model_config: a diffusers folder with its configs")
        return str(preset_path(cfg.base_model_config)) if is_preset(cfg.base_model_config) else cfg.base_model_config
    return source
