"""Failures: invalid data, a killed trainer, evictions, exhausted retries, deadlines, no node, no image."""

import json
import os
import signal

import pytest

from tests.e2e import operator_env as env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def kill_trainer(jobs, name, when=lambda status: True, timeout=300):
    """SIGKILL the trainer process of the job's running pod once `when(status)` holds; returns the pod name."""

    def target():
        pod = jobs.running_pod(name)
        if pod is None or not when(jobs.status(name)):
            return None
        pids = env.find_trainer_pids(jobs.namespace, pod["metadata"]["name"])
        return (pod["metadata"]["name"], pids) if pids else None

    pod_name, pids = env.wait_until(target, timeout, f"a trainer of {name} to kill", interval=0.3)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pod_name


def terminated(jobs, pod_name):
    out = jobs.kubectl("get", "pod", pod_name, "-o", "json", check=False)
    if out.returncode != 0:
        return None
    state = json.loads(out.stdout)["status"].get("containerStatuses", [{}])[0].get("state", {})
    return state.get("terminated")


def final_weights(jobs, status):
    """{tensor name: tensor} of the job's pytorch_lora_weights.safetensors, read back from S3."""
    from safetensors.torch import load

    uri = next(a["uri"] for a in status["artifacts"] if a["uri"].endswith("/pytorch_lora_weights.safetensors"))
    return load(jobs.s3_bytes(uri))


def test_invalid_dataset_fails_at_once_without_retry(jobs):
    jobs.apply(
        env.sd_manifest("no-data", jobs.bucket, dataset={"uri": f"s3://{jobs.bucket}/nothing-here"}, backoffLimit=3)
    )
    waited = jobs.wait_condition("no-data", "Failed", 300)
    assert waited.returncode == 0, waited.stderr
    status = jobs.status("no-data")
    assert (status["phase"], status["reason"]) == ("Failed", "DatasetInvalid")
    assert "nothing-here" in status["message"]
    assert status["attempts"] == 1 and len(jobs.pods("no-data")) == 1  # permanent: no second pod
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "DatasetInvalid"
    assert any(e["reason"] == "DatasetInvalid" and e["type"] == "Warning" for e in jobs.events("no-data"))


def test_killed_trainer_resumes_from_its_checkpoint_with_the_same_final_weights(jobs):
    steps, save = 96, 16  # several seconds after the step-16 checkpoint to find and kill the trainer in
    jobs.apply(env.sd_manifest("reference", jobs.bucket, steps=steps, save_steps=save))
    jobs.apply(env.sd_manifest("killed", jobs.bucket, steps=steps, save_steps=save, backoffLimit=2))
    manifest_key = f"out/killed/checkpoints/state_step_{save}/manifest.json"
    first = kill_trainer(
        jobs,
        "killed",
        lambda s: (
            (s.get("progress") or {}).get("step", 0) > save and manifest_key in jobs.s3_keys("out/killed/checkpoints/")
        ),
    )
    env.wait_until(lambda: (terminated(jobs, first) or {}).get("exitCode") == 137, 60, "exit code 137")
    assert jobs.wait_condition("killed", "Succeeded", 500).returncode == 0
    assert jobs.wait_condition("reference", "Succeeded", 300).returncode == 0
    killed, reference = jobs.status("killed"), jobs.status("reference")
    assert killed["attempts"] == 2 and reference["attempts"] == 1
    import torch

    ours, theirs = final_weights(jobs, killed), final_weights(jobs, reference)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"resumed weights differ from the uninterrupted run in {len(different)} tensors"
    second = jobs.pods("killed")[-1]["metadata"]["name"]
    log = jobs.kubectl("logs", second).stdout
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert resumed and "state_step_" in resumed[0]
    assert int(resumed[0].rsplit("at step", 1)[1].split()[0]) >= save
    reasons = {e["reason"] for e in jobs.events("killed")}
    assert "Restarting" in reasons and "AttemptStarted" in reasons


def test_eviction_does_not_count_against_backoff_limit(jobs, node_agent):
    jobs.apply(env.sd_manifest("evicted", jobs.bucket, steps=96, save_steps=32, backoffLimit=0))
    pod = env.wait_until(
        lambda: (lambda p: p if p and (jobs.status("evicted").get("progress") or {}).get("step", 0) >= 2 else None)(
            jobs.running_pod("evicted")
        ),
        300,
        "training to be under way",
    )
    node_agent.evict(jobs.namespace, pod["metadata"]["name"])
    assert jobs.wait_condition("evicted", "Succeeded", 500).returncode == 0
    status = jobs.status("evicted")
    assert status["attempts"] == 2
    training_job = jobs.get(status["children"]["job"], kind="job")
    assert training_job["status"].get("failed", 0) == 0  # backoffLimit 0 and still no failure counted
    assert "Evicted" in {e["reason"] for e in jobs.events("evicted")}


def test_backoff_limit_exhausted(jobs):
    jobs.apply(env.sd_manifest("crashy", jobs.bucket, steps=2000, save_steps=500, backoffLimit=1))
    first = kill_trainer(jobs, "crashy")
    kill_trainer(jobs, "crashy", lambda s: s.get("attempts", 0) >= 2 and s.get("currentPod", {}).get("name") != first)
    waited = jobs.wait_condition("crashy", "Failed", 300)
    assert waited.returncode == 0, waited.stderr
    status = jobs.status("crashy")
    assert (status["phase"], status["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert "backoffLimit 1" in status["message"] and "137" in status["message"]
    assert status["attempts"] == 2


def test_active_deadline_fails_the_job(jobs):
    jobs.apply(env.sd_manifest("slow", jobs.bucket, steps=5000, save_steps=1000, activeDeadlineSeconds=25))
    assert jobs.wait_condition("slow", "Failed", 240).returncode == 0
    status = jobs.status("slow")
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded")
    assert "activeDeadlineSeconds (25 s)" in status["message"]
    env.wait_until(lambda: jobs.running_pod("slow") is None, 120, "the trainer pod to stop")


def test_more_gpus_than_any_node_has_stays_pending_with_the_reason(jobs):
    jobs.apply(env.sd_manifest("greedy", jobs.bucket, resources={"gpus": 3}))
    status = jobs.wait_phase("greedy", "Pending", 120, reason="Unschedulable")
    assert "Insufficient nvidia.com/gpu" in status["message"]
    running = {c["type"]: c for c in status["conditions"]}["Running"]
    assert running["status"] == "False" and running["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in running["message"]
    waited = jobs.kubectl("wait", "--for=jsonpath={.status.reason}=Unschedulable", "ltj/greedy", "--timeout=10s")
    assert waited.returncode == 0


def test_image_that_cannot_be_pulled_is_reported(jobs):
    jobs.apply(env.sd_manifest("no-image", jobs.bucket, image="registry.invalid/nothing:1"))
    status = jobs.wait_phase("no-image", "Pending", 120, reason="ImagePullFailed")
    assert "registry.invalid/nothing:1" in status["message"] or "ImagePull" in status["message"]
    assert any(e["reason"] == "ImagePullFailed" for e in jobs.events("no-image"))


def test_config_the_trainer_refuses_fails_before_any_pod(jobs):
    # valid for the CRD, invalid for the trainer's cross-field check (resolution outside the bucket range)
    jobs.apply(
        env.sd_manifest(
            "mis-bucketed",
            jobs.bucket,
            dataset={
                "uri": f"s3://{jobs.bucket}/data/images",
                "resolution": 32,
                "bucketing": {"enabled": True, "minResolution": 64, "maxResolution": 128},
            },
        )
    )
    status = jobs.wait_phase("mis-bucketed", "Failed", 60, reason="ConfigInvalid")
    assert "resolution" in status["message"] and "min_bucket_reso" in status["message"]
    assert jobs.pods("mis-bucketed") == [] and jobs.get("mis-bucketed-train", kind="job") is None
    assert jobs.wait_condition("mis-bucketed", "Failed", 10).returncode == 0


def test_out_of_memory_is_reported_with_the_pods_own_reason(jobs):
    jobs.apply(env.sd_manifest("tight", jobs.bucket, backoffLimit=0, resources={"gpus": 0, "memory": "150Mi"}))
    assert jobs.wait_condition("tight", "Failed", 300).returncode == 0
    status = jobs.status("tight")
    assert (status["phase"], status["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert "OOMKilled" in status["message"] and "spec.resources.memory" in status["message"]
