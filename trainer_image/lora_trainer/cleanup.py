"""What cleanupPolicy DeleteOutputs runs when its LoRATrainingJob is deleted (the operator's cleanup Job):

    python -m lora_trainer.cleanup s3://bucket/prefix job:<uid>

It deletes only what that job owns (ownership.py): nothing when the prefix's .lora-owner.json names another
owner or is missing (the job never wrote there), and never a sub-prefix that another owner's marker claims.
It prints what it did and writes it as the pod's termination message; the operator turns a "kept" outcome
into an Event. Storage errors end non-zero (the Job fails and the operator reports it).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .ownership import MAX_MARKER_BYTES, OWNER_MARKER, Owner, parse_marker

log = logging.getLogger("lora_trainer")
TERMINATION_LOG = "/dev/termination-log"


@dataclass(frozen=True)
class Plan:
    """What a cleanup deletes (keys) and why it keeps the rest (one line per kept prefix)."""

    delete: list[str]
    kept: list[str]


def plan(prefix: str, keys: list[str], owners: dict[str, Owner], ours: str) -> Plan:
    """The keys under `prefix` (a folder prefix, ending in '/') that the owner `ours` may delete.

    `owners`: the owner of every marker among `keys` (key of the marker -> Owner). The prefix's own marker
    must name `ours`; a deeper marker of another owner keeps its whole sub-prefix.
    """
    top = owners.get(prefix + OWNER_MARKER)
    where = f"the prefix {prefix}"
    if top is None:
        return Plan([], [f"{where} has no {OWNER_MARKER}: this job never wrote there; nothing deleted"])
    if top.id != ours:
        return Plan([], [f"{where} belongs to {top.name}, not this job; nothing deleted"])
    foreign = sorted(
        marker[: -len(OWNER_MARKER)]
        for marker, owner in owners.items()
        if owner.id != ours and marker != prefix + OWNER_MARKER
    )
    delete = [k for k in keys if not any(k.startswith(sub) for sub in foreign)]
    kept = [f"{sub} belongs to {owners[sub + OWNER_MARKER].name}; kept" for sub in foreign]
    # the marker goes last: a cleanup cut short can run again and still knows the prefix was ours
    delete.sort(key=lambda k: k == prefix + OWNER_MARKER)
    return Plan(delete, kept)


def clean(store, uri: str, ours: str) -> str:
    """Deletes what `ours` owns under the s3:// uri; returns the one-line outcome."""
    from .storage.uri import S3Uri

    prefix = S3Uri.parse(uri)
    listing = store.list(prefix)
    owners = {}
    for key in listing:
        if key.rsplit("/", 1)[-1] == OWNER_MARKER:
            got = store.get_with_etag(S3Uri(prefix.bucket, key), MAX_MARKER_BYTES + 1)
            owners[key] = parse_marker(got[0] if got else b"")[0]
    result = plan(prefix.folder_prefix, sorted(listing), owners, ours)
    owned = [k for k in result.delete if not k.endswith(OWNER_MARKER)]
    markers = [k for k in result.delete if k.endswith(OWNER_MARKER)]
    store.delete(prefix.bucket, owned)
    store.delete(prefix.bucket, markers)
    outcome = f"deleted {len(result.delete)} object(s) under s3://{prefix.bucket}/{prefix.folder_prefix}"
    return "; ".join([outcome, *(f"kept: {line}" for line in result.kept)])


def main(argv: list[str] | None = None) -> int:
    from .logs import setup_logging
    from .storage.client import Retry, make_client
    from .storage.store import Store

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[0].startswith("s3://") or not args[1]:
        print("usage: python -m lora_trainer.cleanup s3://bucket/prefix job:<uid>", file=sys.stderr)
        return 2
    setup_logging(quiet=False)
    store = Store(make_client(), Retry(seconds=float(os.environ.get("LORA_CLEANUP_RETRY_SECONDS", "120"))))
    try:
        outcome = clean(store, args[0], args[1])
    finally:
        store.close()
    log.info("%s", outcome)
    path = Path(os.environ.get("LORA_TERMINATION_MESSAGE_PATH", TERMINATION_LOG))
    if path.exists() or "LORA_TERMINATION_MESSAGE_PATH" in os.environ:
        path.write_text(outcome[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
