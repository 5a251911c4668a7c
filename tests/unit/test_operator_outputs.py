"""One live job per output prefix (operator/lora_operator/outputs.py)."""

from __future__ import annotations

from lora_operator.names import JobKey
from lora_operator.outputs import OutputClaim, output_conflict, overlaps


def claim(name, uri, created="2026-01-01T00:00:10Z", live=True, started=False, phase="Running", uid=None):
    return OutputClaim(JobKey("ns", name), uid or f"uid-{name}", uri, created, phase, live, started)


def test_overlapping_prefixes():
    assert overlaps("s3://b/cats", "s3://b/cats/") and overlaps("s3://b/cats", "s3://b/cats/v2")
    assert overlaps("s3://b/cats/v2", "s3://b/cats")
    assert not overlaps("s3://b/cats", "s3://b/catsup") and not overlaps("s3://b/cats", "s3://c/cats")


def test_a_new_job_is_refused_naming_the_live_job_on_its_prefix():
    mine = claim("new", "s3://b/cats/v2", created="2026-01-01T00:01:00Z")
    running = claim("old", "s3://b/cats", started=True)
    problem = output_conflict(mine, [running])
    assert problem.startswith(
        "spec.output.uri s3://b/cats/v2 overlaps s3://b/cats, the output of LoRATrainingJob ns/old"
    )
    assert "(Running)" in problem and "wait until old has finished" in problem


def test_finished_unrelated_and_younger_jobs_do_not_block():
    mine = claim("me", "s3://b/cats")
    assert output_conflict(mine, [claim("done", "s3://b/cats", live=False, phase="Succeeded")]) is None
    assert output_conflict(mine, [claim("dogs", "s3://b/dogs", started=True)]) is None
    assert output_conflict(mine, [claim("me-again", "s3://b/cats", uid="uid-me")]) is None  # itself
    younger = claim("younger", "s3://b/cats", created="2026-01-01T00:02:00Z")
    assert output_conflict(mine, [younger]) is None  # the older of two new jobs goes ahead ...
    assert "ns/me" in output_conflict(younger, [mine])  # ... and the younger is refused
    assert "ns/younger" in output_conflict(
        mine, [claim("younger", "s3://b/cats", "2026-01-01T00:02:00Z", started=True)]
    )
