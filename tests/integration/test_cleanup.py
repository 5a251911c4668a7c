"""DeleteOutputs' cleanup (lora_trainer/cleanup.py) against SeaweedFS: it deletes only what the job owns."""

from __future__ import annotations

import pytest

from lora_trainer.cleanup import main, plan
from lora_trainer.ownership import OWNER_MARKER, Owner

pytestmark = pytest.mark.integration
OURS = Owner("job:uid-1", "LoRATrainingJob a/cats (uid uid-1)")
THEIRS = Owner("job:uid-2", "LoRATrainingJob b/dogs (uid uid-2)")


def test_the_plan_deletes_only_an_owned_prefix_and_never_a_foreign_sub_prefix():
    keys = ["p/.lora-owner.json", "p/w.safetensors", "p/sub/.lora-owner.json", "p/sub/x", "p/subway/y"]
    owners = {"p/.lora-owner.json": OURS, "p/sub/.lora-owner.json": THEIRS}
    result = plan("p/", keys, owners, OURS.id)
    assert result.delete == ["p/w.safetensors", "p/subway/y", "p/.lora-owner.json"]  # the marker last
    assert result.kept == ["p/sub/ belongs to LoRATrainingJob b/dogs (uid uid-2); kept"]
    nested_ours = {**owners, "p/sub/.lora-owner.json": OURS}  # a resumed attempt's marker: still ours
    assert plan("p/", keys, nested_ours, OURS.id).delete == sorted(keys, key=lambda k: k == "p/.lora-owner.json")


@pytest.mark.parametrize(
    "owners, why",
    [
        ({}, "has no .lora-owner.json: this job never wrote there"),
        ({"p/.lora-owner.json": THEIRS}, "belongs to LoRATrainingJob b/dogs (uid uid-2), not this job"),
    ],
)
def test_the_plan_deletes_nothing_of_a_prefix_the_job_does_not_own(owners, why):
    result = plan("p/", ["p/.lora-owner.json", "p/w"], owners, OURS.id)
    assert result.delete == [] and why in result.kept[0]


def put(client, bucket, key, body=b"x"):
    client.put_object(Bucket=bucket, Key=key, Body=body)


def test_cleanup_on_s3(s3_server, s3_bucket, monkeypatch, tmp_path, capfd):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LORA_TERMINATION_MESSAGE_PATH", str(tmp_path / "termination-log"))
    client = s3_server.client()
    put(client, s3_bucket, f"out/cats/{OWNER_MARKER}", OURS.marker())
    for key in ("out/cats/pytorch_lora_weights.safetensors", "out/cats/checkpoints/state_step_2/manifest.json"):
        put(client, s3_bucket, key)
    put(client, s3_bucket, f"out/cats/dogs/{OWNER_MARKER}", THEIRS.marker())
    put(client, s3_bucket, "out/cats/dogs/pytorch_lora_weights.safetensors")
    put(client, s3_bucket, f"out/bird/{OWNER_MARKER}", b"\x00" * 10_000_000)  # hostile: not a marker to read
    put(client, s3_bucket, "out/catsup/keep")  # a neighbour sharing the first letters

    assert main([f"s3://{s3_bucket}/out/cats", OURS.id]) == 0
    left = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", []))
    assert left == [
        f"out/bird/{OWNER_MARKER}",
        f"out/cats/dogs/{OWNER_MARKER}",
        "out/cats/dogs/pytorch_lora_weights.safetensors",
        "out/catsup/keep",
    ]
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith(f"deleted 3 object(s) under s3://{s3_bucket}/out/cats/")
    assert "kept: out/cats/dogs/ belongs to LoRATrainingJob b/dogs (uid uid-2); kept" in message

    assert main([f"s3://{s3_bucket}/out/bird", OURS.id]) == 0  # an unreadable marker is nobody we know
    assert "belongs to an unreadable .lora-owner.json" in (tmp_path / "termination-log").read_text()
    assert main(["not-a-uri", OURS.id]) == 2 and "usage" in capfd.readouterr().err
