"""One live job per output prefix: which other LoRATrainingJob in the cluster already writes where a new one
would. Two jobs on one prefix would overwrite each other's weights and records (their trainers would refuse
each other too, ownership.py; this names the other job before any pod starts)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .names import JobKey


@dataclass(frozen=True)
class OutputClaim:
    """A job's spec.output.uri as the operator last saw the job."""

    key: JobKey
    uid: str
    uri: str
    created: str  # metadata.creationTimestamp (RFC 3339 sorts as text)
    phase: str  # status.phase ("" before the first status)
    live: bool  # neither finished nor being deleted
    started: bool  # its training Job exists (status.startTime)


def overlaps(a: str, b: str) -> bool:
    """Whether two output prefixes share objects: equal, or one lies under the other."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def output_conflict(mine: OutputClaim, others: Iterable[OutputClaim]) -> str | None:
    """Why `mine` may not start: a live job whose output overlaps it that started already or was created
    first (the older of two new jobs goes ahead); None when there is none."""
    rivals = sorted(
        (
            o
            for o in others
            if o.live and o.uid != mine.uid and overlaps(o.uri, mine.uri)
            if o.started or (o.created, o.uid) < (mine.created, mine.uid)
        ),
        key=lambda o: (o.created, o.uid),
    )
    if not rivals:
        return None
    other = rivals[0]
    return (
        f"spec.output.uri {mine.uri} overlaps {other.uri}, the output of LoRATrainingJob {other.key} "
        f"({other.phase or 'Pending'}); two jobs on one prefix would overwrite each other's weights. Use another "
        f"spec.output.uri, or wait until {other.key.name} has finished"
    )
