"""The trainer's termination message as the operator reads it: parsed, then checked field by field against
the contract of docs/trainer-operator.md (Termination message).

The trainer image is the user's (spec.image): its message is trusted for nothing. A field of the wrong type,
a number that is not finite or out of range, a text too long, or a URI outside spec.output.uri is dropped
(never patched into status) and named in `problems`, which the operator posts as a Warning Event.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("succeeded", "failed", "interrupted")
MAX_INT = 2**53  # JSON numbers every client reads exactly
MAX_ERROR = 4096  # the kubelet keeps 4096 bytes of a termination message
MAX_URI = 2048
MAX_ARTIFACTS = 64
REASON = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")  # a Kubernetes condition reason, CamelCase
FORMAT = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class Reading:
    """A checked termination message: the fields that passed, and one line per field that did not."""

    summary: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)


def read_message(message: str | None, output_uri: str | None = None) -> Reading:
    """The trainer's one-line JSON exit summary (the last JSON line of the message), checked. With
    output_uri, artifact and checkpoint URIs must lie under it; None when the message holds no summary."""
    doc = _last_json_object(message or "")
    if doc is None:
        return Reading(None)
    if doc.get("status") not in STATUSES:
        return Reading(None, [f"status: {_show(doc.get('status'))} is not one of {', '.join(STATUSES)}"])
    problems: list[str] = []
    summary = {"status": doc["status"]}
    for key, value in doc.items():
        if key == "status" or value is None:  # null: the field is absent (loss before the first step)
            continue
        check = FIELDS.get(key)
        if check is None:
            problems.append(f"{_show_key(key)}: not a field of the termination message")
            continue
        kept = check(value, key, problems, output_uri)
        if kept is not None:
            summary[key] = kept
    return Reading(summary, problems)


def under(uri: str, output_uri: str | None) -> bool:
    """Whether uri lies under spec.output.uri (no output_uri: any URI)."""
    if output_uri is None:
        return True
    prefix = output_uri.rstrip("/") + "/"
    return uri.startswith(prefix) and "/../" not in uri[len(prefix) - 1 :] + "/"


def _last_json_object(message: str) -> dict[str, Any] | None:
    for line in reversed(message.strip().splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line, parse_constant=lambda name: name)  # NaN, Infinity: kept as text, refused below
        except (ValueError, RecursionError):
            continue
        if isinstance(doc, dict) and "status" in doc:
            return doc
    return None


# -- one checker per field: (value, key, problems, output_uri) -> the value to keep, or None
Checker = Callable[[Any, str, list[str], "str | None"], Any]


def _integer(low: int, high: int) -> Checker:
    def check(value: Any, key: str, problems: list[str], output_uri: str | None) -> int | None:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        problems.append(f"{key}: {_show(value)} is not a whole number from {low} to {high}")
        return None

    return check


def _number(value: Any, key: str, problems: list[str], output_uri: str | None) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    problems.append(f"{key}: {_show(value)} is not a finite number")
    return None


def _flag(value: Any, key: str, problems: list[str], output_uri: str | None) -> bool | None:
    if isinstance(value, bool):
        return value
    problems.append(f"{key}: {_show(value)} is not true or false")
    return None


def _text(limit: int) -> Checker:
    def check(value: Any, key: str, problems: list[str], output_uri: str | None) -> str | None:
        if isinstance(value, str):
            return value if len(value) <= limit else value[:limit] + " [...]"
        problems.append(f"{key}: {_show(value)} is not text")
        return None

    return check


def _matching(pattern: re.Pattern[str], what: str) -> Checker:
    def check(value: Any, key: str, problems: list[str], output_uri: str | None) -> str | None:
        if isinstance(value, str) and pattern.fullmatch(value):
            return value
        problems.append(f"{key}: {_show(value)} is not {what}")
        return None

    return check


def _lowercase(check: Checker) -> Checker:
    def lowered(value: Any, key: str, problems: list[str], output_uri: str | None) -> str | None:
        kept = check(value, key, problems, output_uri)
        return None if kept is None else kept.lower()

    return lowered


def _uri(value: Any, key: str, problems: list[str], output_uri: str | None) -> str | None:
    if not isinstance(value, str) or not value or len(value) > MAX_URI or not value.isprintable():
        problems.append(f"{key}: {_show(value)} is not a URI of at most {MAX_URI} printable characters")
        return None
    if not under(value, output_uri):
        problems.append(f"{key}: {_show(value)} is not under spec.output.uri {output_uri}")
        return None
    return value


def _record(fields: dict[str, Checker], required: tuple[str, ...]) -> Checker:
    """An object with the given fields; dropped whole when a required one is missing or wrong."""

    def check(value: Any, key: str, problems: list[str], output_uri: str | None) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            problems.append(f"{key}: {_show(value)} is not an object")
            return None
        out: dict[str, Any] = {}
        for name, item in value.items():
            if item is None:
                continue
            checker = fields.get(name)
            if checker is None:
                problems.append(f"{key}.{_show_key(name)}: not a field")
                continue
            kept = checker(item, f"{key}.{name}", problems, output_uri)
            if kept is not None:
                out[name] = kept
        missing = [name for name in required if name not in out]
        if missing:
            problems.append(f"{key}: dropped, it has no valid {', '.join(missing)}")
            return None
        return out

    return check


def _list_of(item: Checker, limit: int) -> Checker:
    def check(value: Any, key: str, problems: list[str], output_uri: str | None) -> list[Any] | None:
        if not isinstance(value, list):
            problems.append(f"{key}: {_show(value)} is not a list")
            return None
        if len(value) > limit:
            problems.append(f"{key}: {len(value)} items, more than {limit}; the rest are dropped")
        kept = [item(v, f"{key}[{i}]", problems, output_uri) for i, v in enumerate(value[:limit])]
        return [v for v in kept if v is not None]

    return check


STEP = _integer(0, MAX_INT)
FIELDS: dict[str, Checker] = {
    "exitCode": _integer(0, 255),
    "step": STEP,
    "totalSteps": STEP,
    "loss": _number,
    "rank": _integer(0, 65535),
    "worldSize": _integer(1, 65536),
    "error": _text(MAX_ERROR),
    "reason": _matching(REASON, "a CamelCase reason of at most 64 letters and digits"),
    "permanent": _flag,
    "artifactsOmitted": _integer(0, MAX_INT),
    "lastCheckpoint": _record({"step": STEP, "uri": _uri}, required=("step", "uri")),
    "artifacts": _list_of(
        _record(
            {
                "uri": _uri,
                "format": _matching(FORMAT, "a format name"),
                "sha256": _lowercase(_matching(SHA256, "64 hex digits")),
                "step": STEP,
                "size": STEP,
            },
            required=("uri",),
        ),
        MAX_ARTIFACTS,
    ),
}


def _show(value: Any, limit: int = 60) -> str:
    """A value as the problem line shows it: short, one line."""
    try:
        text = json.dumps(value, ensure_ascii=True, default=str)
    except (ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 5] + " [...]"


def _show_key(key: str) -> str:
    return key if len(key) <= 40 and key.isprintable() else _show(key, 40)
