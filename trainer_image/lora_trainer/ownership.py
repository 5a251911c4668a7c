"""One owner per output prefix: a run claims its output_dir (locally and on S3) before it writes anything.

    <output_dir>/.lora-owner.json   {"owner": "job:<uid>" | "local:<user>@<host>", "name": ..., "claimed": ...}

The owner is the LoRATrainingJob (its UID, LORA_JOB_UID, set by the operator) or, for lora-train without
a cluster, the user on the machine. Every attempt of one job is the same owner, so a resumed or restarted
run continues; a different owner is refused (exit 6) naming the one that holds the prefix, unless the run
sets `overwrite: true`, which takes the prefix over. The operator's DeleteOutputs deletes a prefix only while
its job owns it. Torch-free: storage and the operator's cleanup read it.
"""

from __future__ import annotations

import datetime
import getpass
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

OWNER_MARKER = ".lora-owner.json"
MAX_MARKER_BYTES = 4096  # a marker is a few hundred bytes; a larger object there is not one of ours


@dataclass(frozen=True)
class Owner:
    id: str  # what decides: "job:<uid>" or "local:<user>@<host>"
    name: str  # for people: "LoRATrainingJob team-a/sdxl" or "lora-train run by alice@laptop"

    def marker(self, now: datetime.datetime | None = None) -> bytes:
        claimed = (now or datetime.datetime.now(datetime.UTC)).isoformat(timespec="seconds")
        return json.dumps({"owner": self.id, "name": self.name, "claimed": claimed}, indent=1).encode() + b"\n"


def owner_from_env(env: Mapping[str, str] = os.environ) -> Owner:
    uid = env.get("LORA_JOB_UID")
    if uid:
        job = f"{env.get('LORA_JOB_NAMESPACE', 'default')}/{env.get('LORA_JOB_NAME', '?')}"
        return Owner(f"job:{uid}", f"LoRATrainingJob {job} (uid {uid})")
    who = f"{_user()}@{socket.gethostname()}"
    return Owner(f"local:{who}", f"lora-train run by {who}")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return str(os.getuid())


def parse_marker(data: bytes) -> tuple[Owner, str]:
    """(owner, claimed) of a marker's bytes; a marker that is not ours to read is an unknown owner."""
    try:
        if len(data) > MAX_MARKER_BYTES:
            raise ValueError
        raw = json.loads(data)
        owner = Owner(str(raw["owner"])[:200], str(raw.get("name") or raw["owner"])[:200])
        return owner, str(raw.get("claimed", "?"))[:40]
    except (ValueError, TypeError, KeyError):
        return Owner("unknown", f"an unreadable {OWNER_MARKER}"), "?"


def claim_problem(held: bytes | None, ours: Owner, overwrite: bool, where: str) -> str | None:
    """Why this run may not write to `where` (whose marker holds `held`), or None: it is free, ours, or
    taken over with overwrite: true."""
    if held is None:
        return None
    owner, claimed = parse_marker(held)
    if owner.id == ours.id or overwrite:
        return None
    return (
        f"output_dir {where} belongs to {owner.name} (claimed {claimed}); this is {ours.name}. Choose another "
        "output prefix, or set overwrite: true to take it over and replace its outputs"
    )
