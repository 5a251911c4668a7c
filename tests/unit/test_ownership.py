"""One owner per output prefix: who a run is, and when a marker lets it write (the S3 side:
tests/integration/test_trainer_s3.py)."""

from __future__ import annotations

import datetime
import json

import pytest

from lora_trainer.ownership import MAX_MARKER_BYTES, Owner, claim_problem, owner_from_env, parse_marker

JOB_ENV = {"LORA_JOB_UID": "1b2c", "LORA_JOB_NAME": "sdxl", "LORA_JOB_NAMESPACE": "team-a"}


def test_a_job_is_its_uid_and_a_laptop_run_its_user_and_host():
    assert owner_from_env(JOB_ENV) == Owner("job:1b2c", "LoRATrainingJob team-a/sdxl (uid 1b2c)")
    local = owner_from_env({})
    assert local.id.startswith("local:") and "@" in local.id and local.name.startswith("lora-train run by ")


def test_a_marker_round_trips():
    owner = owner_from_env(JOB_ENV)
    data = owner.marker(datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC))
    assert parse_marker(data) == (owner, "2026-12-01T12:00:00+00:00")
    assert json.loads(data)["owner"] == "job:1b2c"


@pytest.mark.parametrize(
    "data",
    [b"", b"{not json", b"[]", b'{"name": "x"}', b'{"owner": "job:x", "pad": "' + b"x" * MAX_MARKER_BYTES + b'"}'],
)
def test_a_marker_that_is_not_ours_to_read_is_an_unknown_owner(data):
    owner, _ = parse_marker(data)
    assert owner.id == "unknown" and owner.name == "an unreadable .lora-owner.json"


def test_hostile_marker_text_is_cut_short():
    owner, claimed = parse_marker(json.dumps({"owner": "job:" + "x" * 1000, "claimed": "y" * 1000}).encode())
    assert len(owner.id) == 200 and len(claimed) == 40


@pytest.mark.parametrize(
    "held, overwrite, refused",
    [
        (None, False, False),  # a free prefix
        ("job:1b2c", False, False),  # ours: a restarted or resumed attempt of the same job
        ("job:other", False, True),
        ("job:other", True, False),  # overwrite: true takes it over
        ("local:alice@laptop", False, True),
    ],
)
def test_who_may_write(held, overwrite, refused):
    ours = owner_from_env(JOB_ENV)
    data = Owner(held, f"the owner {held}").marker() if held else None
    problem = claim_problem(data, ours, overwrite, "s3://b/run")
    assert (problem is not None) == refused
    if refused:
        assert f"output_dir s3://b/run belongs to the owner {held} (claimed 20" in problem
        assert "this is LoRATrainingJob team-a/sdxl (uid 1b2c)" in problem and "overwrite: true" in problem
