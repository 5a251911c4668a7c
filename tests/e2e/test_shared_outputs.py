"""One owner per output prefix, through the operator (issue 14): a job on a live job's prefix is refused
before any pod, naming that job; after it finished, another job's trainer refuses the prefix naming its
owner, unless the new job sets output.overwrite."""

import pytest

from tests.e2e import operator_env as env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_prefix_has_one_owner(jobs):
    jobs.apply(env.sd_manifest("first", jobs.bucket, steps=24, save_steps=8))
    jobs.wait_phase("first", "Running", timeout=180)
    nested = env.sd_manifest("second", jobs.bucket, output={"uri": f"s3://{jobs.bucket}/out/first/v2"})
    jobs.apply(nested)
    status = jobs.wait_phase("second", "Failed", timeout=60, reason="OutputInUse")
    assert f"the output of LoRATrainingJob {jobs.namespace}/first (Running)" in status["message"], status
    assert jobs.pods("second") == []
    assert jobs.wait_condition("first", "Succeeded", 420).returncode == 0

    uid = jobs.get("first")["metadata"]["uid"]
    jobs.apply(env.sd_manifest("third", jobs.bucket, output={"uri": f"s3://{jobs.bucket}/out/first"}))
    status = jobs.wait_phase("third", "Failed", timeout=240)
    assert status["reason"] == "StorageInvalid", status
    assert f"belongs to LoRATrainingJob {jobs.namespace}/first (uid {uid})" in status["message"], status

    jobs.apply(
        env.sd_manifest(
            "fourth", jobs.bucket, steps=4, output={"uri": f"s3://{jobs.bucket}/out/first", "overwrite": True}
        )
    )
    assert jobs.wait_condition("fourth", "Succeeded", 300).returncode == 0
    marker = jobs.s3_bytes(f"s3://{jobs.bucket}/out/first/.lora-owner.json").decode()
    assert jobs.get("fourth")["metadata"]["uid"] in marker
