"""Turns raw YAML mappings into a validated, fully resolved TrainConfig, all problems reported at once."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import PurePosixPath
from typing import Any

from ..errors import ConfigError
from .schema import TrainConfig, alias_table, config_fields


def canonical_keys(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Maps aliases onto canonical keys; unknown keys are problems that name the closest known key."""
    table = alias_table()
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        name = table.get(str(key))
        if name is None:
            problems.append(f"unknown key '{key}'{_did_you_mean(str(key), table)}")
        elif name in out:
            problems.append(f"'{key}' sets '{name}' a second time (keys and their aliases are the same setting)")
        else:
            out[name] = value
    return out, problems


def _did_you_mean(key: str, table: dict[str, str]) -> str:
    close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.6)
    if not close:
        return ""
    canonical = table[close[0]]
    hint = close[0] if close[0] == canonical else f"{close[0]} (= {canonical})"
    return f"; did you mean '{hint}'?"


def build_config(raw: dict[str, Any], source: str = "config", overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Validates a flat mapping (aliases allowed), then `overrides` on top, into a resolved TrainConfig.

    Raises ConfigError listing every problem at once: unknown keys, types, ranges, choices, combinations.
    """
    values, problems = canonical_keys(raw)
    extra, extra_problems = canonical_keys(overrides or {})
    values.update(extra)
    problems += [f"--set {p}" for p in extra_problems]
    hints = typing.get_type_hints(TrainConfig)
    kwargs: dict[str, Any] = {}
    for f in config_fields():
        if f.name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"'{f.name}' is required: {f.metadata['doc']}")
            continue
        try:
            kwargs[f.name] = _check_value(f, hints[f.name], values[f.name])
        except ValueError as err:
            problems.append(f"'{f.name}': {err}")
    if not problems:
        cfg = TrainConfig(**kwargs)
        problems = other_task_problems(cfg) + cross_field_problems(cfg)
    if problems:
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
    return resolve_defaults(cfg)


def _check_value(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    meta = f.metadata
    if value is False and "no" in (meta["choices"] or ()):
        value = "no"  # YAML 1.1 reads an unquoted `mixed_precision: no` as false
    value = _coerce(hint, value, meta["comma_list"])
    for item in value if isinstance(value, list) else [value]:
        if item is None:
            continue
        if meta["choices"] and item not in meta["choices"]:
            raise ValueError(f"'{item}' is not one of {', '.join(meta['choices'])}")
        _check_range(item, meta)
    return value


def _check_range(value: Any, meta: dict) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi = meta["min"], meta["max"]
    if lo is not None and (value < lo or (meta["min_exclusive"] and value == lo)):
        raise ValueError(f"must be {'>' if meta['min_exclusive'] else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"must be <= {hi}, got {value}")


def _coerce(hint: Any, value: Any, comma_list: bool = True) -> Any:
    """Checks a YAML value against a field's type, converting only the unambiguous cases."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, comma_list)
    if typing.get_origin(hint) is list:
        if isinstance(value, str):  # "to_q,to_k" as lora-scripts writes lists; a lone prompt stays whole
            value = [v.strip() for v in value.split(",") if v.strip()] if comma_list else [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of strings, got {value!r}")
        if not value:
            raise ValueError("must not be empty")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"expected a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ValueError(f"expected a finite number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected text, got {value!r}")
    raise TypeError(f"unsupported config type {hint}")


def other_task_problems(cfg: TrainConfig) -> list[str]:
    """Keys set for another task would be silently ignored: each is a problem that names its task."""
    problems = []
    for f in config_fields():
        tasks = f.metadata["tasks"]
        if tasks and cfg.task_type not in tasks and getattr(cfg, f.name) != _default(f):
            problems.append(f"'{f.name}' applies to {' and '.join(tasks)} only (task_type is {cfg.task_type})")
    return problems


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def cross_field_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    if cfg.base_model.strip() == "":
        problems.append("'base_model' is empty")
    if cfg.train_data_dir.strip() == "":
        problems.append("'train_data_dir' is empty")
    if cfg.resume is not None and cfg.resume.strip() == "":
        problems.append("'resume' is empty: use 'latest' or a checkpoint folder")
    if cfg.caption_extension and not cfg.caption_extension.startswith("."):
        problems.append(f"'caption_extension' must start with a dot, like .txt (got {cfg.caption_extension!r})")
    if cfg.output_name is not None and (not cfg.output_name or "/" in cfg.output_name):
        problems.append(f"'output_name' must be a plain file name without '/', got {cfg.output_name!r}")
    if cfg.max_train_steps is not None and cfg.lr_warmup_steps > cfg.max_train_steps:
        problems.append(f"'lr_warmup_steps' ({cfg.lr_warmup_steps}) exceeds 'max_train_steps' ({cfg.max_train_steps})")
    if cfg.validation_data and cfg.validation_split:
        problems.append("set 'validation_data' or 'validation_split', not both")
    if cfg.cache_latents and not cfg.center_crop:
        problems.append("'cache_latents' needs center_crop: true (a random crop would change the latents each epoch)")
    if cfg.cache_text_encoder_outputs and cfg.train_text_encoder:
        problems.append("'cache_text_encoder_outputs' cannot be used with train_text_encoder (the outputs change)")
    if cfg.enable_bucket and not cfg.min_bucket_reso <= cfg.resolution <= cfg.max_bucket_reso:
        problems.append(
            f"'resolution' ({cfg.resolution}) must lie between 'min_bucket_reso' ({cfg.min_bucket_reso}) and "
            f"'max_bucket_reso' ({cfg.max_bucket_reso}) when enable_bucket is on"
        )
    if cfg.enable_bucket and cfg.bucket_reso_steps > cfg.resolution:
        problems.append(
            f"'bucket_reso_steps' ({cfg.bucket_reso_steps}) must be at most 'resolution' ({cfg.resolution}) when "
            "enable_bucket is on (bucket sides are multiples of it)"
        )
    if cfg.quantize_text_encoders and cfg.base_quantization == "none":
        problems.append("'quantize_text_encoders' needs a base_quantization format (int8, fp8 or nf4), got none")
    if cfg.quantize_text_encoders and cfg.train_text_encoder:
        problems.append(
            "'quantize_text_encoders' cannot be used with train_text_encoder (it quantizes frozen encoders)"
        )
    if cfg.distributed_strategy == "fsdp" and cfg.base_quantization not in ("none", "nf4"):
        problems.append(
            f"'distributed_strategy': fsdp cannot shard a base stored as base_quantization: {cfg.base_quantization}"
            " (torchao's int8 and fp8 weight tensors do not implement FSDP2's all-gather); use "
            "base_quantization: nf4 (sharded as torchao's NF4Tensor) or none with fsdp, or distributed_strategy: "
            "ddp with the quantized base"
        )
    problems += logging_dir_problems(cfg)
    for key in ("output_dir", "train_data_dir", "base_model", "logging_dir", "metadata_path", "validation_data"):
        value = getattr(cfg, key)
        if isinstance(value, str) and value.startswith("s3://") and not _valid_s3_uri(value):
            problems.append(f"'{key}': {value!r} is not a valid s3://bucket/prefix URI")
    return problems


def logging_dir_problems(cfg: TrainConfig) -> list[str]:
    """logging_dir may be anywhere but output_dir itself or a folder above it: the run's working copy of
    output_dir would then sit inside the logs' one, and preparing one would empty the other."""
    if not cfg.logging_dir:
        return []
    logs, out = _folder(cfg.logging_dir), _folder(cfg.output_dir)
    if out == logs or out.startswith(logs + "/"):
        return [
            f"'logging_dir' ({cfg.logging_dir}) must not be output_dir or a folder above it; "
            f"use a folder of its own, such as {out}/logs (the default)"
        ]
    return []


def _folder(path: str) -> str:
    return path.rstrip("/") if path.startswith("s3://") else os.path.abspath(path)


def _valid_s3_uri(uri: str) -> bool:
    bucket, _, key = uri[len("s3://") :].partition("/")
    parts = PurePosixPath(key).parts
    return 3 <= len(bucket) <= 63 and bucket.replace("-", "").replace(".", "").isalnum() and ".." not in parts


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fills the defaults that depend on other keys, so config_backup.yaml shows what was really used."""
    output_dir = cfg.output_dir.rstrip("/") or cfg.output_dir
    return dataclasses.replace(
        cfg,
        output_dir=output_dir,
        network_alpha=cfg.network_alpha if cfg.network_alpha is not None else float(cfg.lora_rank),
        logging_dir=cfg.logging_dir or f"{output_dir}/logs",
        output_name=cfg.output_name or (PurePosixPath(output_dir).name or "lora"),
        text_encoder_lr=cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate,
    )
