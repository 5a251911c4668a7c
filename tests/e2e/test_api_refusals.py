"""What the API server refuses on the operator's behalf is never retried silently (issue 14): a child it
rejects as invalid fails the job naming the API server's words; one it forbids (a ResourceQuota used up)
keeps the job Pending saying so, and the job starts once the quota allows it."""

import pytest
import yaml

from tests.e2e import operator_env as env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_child_the_api_server_rejects_fails_the_job_naming_why(jobs):
    # a node label value the CRD lets through but a pod spec may not hold
    jobs.apply(env.sd_manifest("rejected", jobs.bucket, resources={"nodeSelector": {"pool": "not a label value!"}}))
    status = jobs.wait_phase("rejected", "Failed", timeout=60)
    assert status["reason"] == "ChildRejected", status
    assert "the API server refused to create Job rejected-train" in status["message"], status
    assert "nodeSelector" in status["message"], status
    assert "ChildRejected" in {e["reason"] for e in jobs.events("rejected")}


def test_a_forbidden_child_keeps_the_job_pending_until_the_quota_allows_it(jobs):
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-jobs"},
        "spec": {"hard": {"count/jobs.batch": "0"}},
    }
    jobs.kubectl("apply", "-f", "-", input=yaml.safe_dump(quota))
    jobs.apply(env.sd_manifest("quota", jobs.bucket, steps=2, save_steps=2))
    status = jobs.wait_phase("quota", "Pending", timeout=60, reason="ChildForbidden")
    assert "exceeded quota: no-jobs" in status["message"] and "retrying" in status["message"], status
    jobs.kubectl("delete", "resourcequota", "no-jobs")
    assert jobs.wait_condition("quota", "Succeeded", 300).returncode == 0
