"""Loading the trainer config from a flat YAML file or a LoRATrainingJob manifest, plus --set overrides."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..redaction import redact
from .manifest import config_from_manifest, config_from_spec, is_manifest
from .schema import TrainConfig, alias_table, config_fields
from .validate import build_config, canonical_keys

__all__ = [
    "TrainConfig",
    "alias_table",
    "build_config",
    "canonical_keys",
    "config_fields",
    "config_from_manifest",
    "config_from_spec",
    "config_to_yaml",
    "is_manifest",
    "load_config",
    "parse_overrides",
    "read_yaml",
]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    try:
        doc = safe_load_bounded(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    except ValueError as err:
        raise ConfigError(f"config file {path}: {err}") from None
    if doc is None:
        raise ConfigError(f"config file {path} is empty")
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values, got {type(doc).__name__}")
    return doc


# a config is a few hundred YAML nodes; aliases can make a short file expand to billions ("billion laughs")
MAX_YAML_NODES = 100_000


def safe_load_bounded(text: str) -> Any:
    """yaml.safe_load, refusing a document whose aliases expand it past MAX_YAML_NODES nodes (or into a
    cycle) before it is built, and one nested too deeply to read."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_nodes(node, {}) > MAX_YAML_NODES:
            raise ValueError(
                f"its aliases expand past {MAX_YAML_NODES} YAML nodes (or refer to themselves); write the values out"
            )
        return None if node is None else loader.construct_document(node)
    except RecursionError:
        raise ValueError("it is nested too deeply to read") from None
    finally:
        loader.dispose()


def _expanded_nodes(node: yaml.Node, seen: dict[int, float]) -> float:
    """How many nodes the document has once every alias is written out (an alias cycle: infinitely many)."""
    if id(node) in seen:
        return seen[id(node)]
    seen[id(node)] = float("inf")  # while counting: reaching it again is a cycle
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_nodes(child, seen) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_nodes(k, seen) + _expanded_nodes(v, seen) for k, v in node.value)
    else:
        total = 1
    seen[id(node)] = total
    return total


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML, so numbers, booleans and lists work."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Reads a flat config or a LoRATrainingJob manifest, applies --set overrides, validates."""
    doc = read_yaml(path)
    raw = config_from_manifest(doc, source=str(path)) if is_manifest(doc) else doc
    return build_config(raw, source=str(path), overrides=parse_overrides(overrides))


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as written to config_backup.yaml; it loads back into an equal TrainConfig, but
    for secrets (a password in s3_endpoint_url, ...), which are never written (redaction.py)."""
    values = {key: redact_value(value) for key, value in dataclasses.asdict(cfg).items()}
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    return [redact_value(v) for v in value] if isinstance(value, list) else value
