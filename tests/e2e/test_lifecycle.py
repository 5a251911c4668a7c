"""Suspend and resume, deletion, a restarted operator, leader election, finished jobs, output clean-up."""

import json
import time

import pytest

from tests.e2e import operator_env as env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def step_of(jobs, name):
    return (jobs.status(name).get("progress") or {}).get("step", 0)


def training_jobs(jobs, name):
    out = jobs.kubectl("get", "jobs", "-l", f"lora-operator.io/job-name={name}", "-o", "json")
    return json.loads(out.stdout)["items"]


def test_suspend_stops_after_a_checkpoint_and_resume_continues_from_it(jobs):
    # ~10 s of training at CPU speed (about 12 steps/s), so the suspend lands mid-run; only SIGTERM checkpoints
    jobs.apply(env.sd_manifest("pausable", jobs.bucket, steps=120, save_steps=1000))
    env.wait_until(lambda: step_of(jobs, "pausable") >= 3, 300, "some training steps")
    jobs.kubectl("patch", "ltj", "pausable", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    status = jobs.wait_phase("pausable", "Suspended", 120)
    assert jobs.wait_condition("pausable", "Suspended", 10).returncode == 0
    checkpoint = status["lastCheckpoint"]
    assert checkpoint["step"] >= 3 and checkpoint["uri"].endswith(f"state_step_{checkpoint['step']}")
    assert f"out/pausable/checkpoints/state_step_{checkpoint['step']}/manifest.json" in jobs.s3_keys("out/pausable/")
    assert "eta" not in status["progress"]
    env.wait_until(lambda: jobs.running_pod("pausable") is None, 60, "no trainer pod while suspended")
    time.sleep(3)
    assert jobs.status("pausable")["phase"] == "Suspended"

    jobs.kubectl("patch", "ltj", "pausable", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    assert jobs.wait_condition("pausable", "Succeeded", 400).returncode == 0
    status = jobs.status("pausable")
    assert status["attempts"] == 2 and status["progress"]["step"] == 120
    log = jobs.kubectl("logs", jobs.pods("pausable")[-1]["metadata"]["name"]).stdout
    assert f"at step {checkpoint['step']}" in next(line for line in log.splitlines() if "resumed from" in line)
    reasons = [e["reason"] for e in jobs.events("pausable")]
    assert "Suspended" in reasons and "Checkpoint" in reasons


def test_deleting_a_running_job_stops_its_pod_and_removes_its_children(jobs):
    jobs.apply(env.sd_manifest("doomed", jobs.bucket, steps=500, save_steps=100))
    pod = env.wait_until(lambda: jobs.running_pod("doomed"), 300, "a running trainer")
    children = jobs.status("doomed")["children"]
    assert jobs.get(children["job"], kind="job") and jobs.get(children["configMap"], kind="configmap")
    jobs.kubectl("delete", "ltj", "doomed", "--wait=false")
    env.wait_until(lambda: jobs.get(pod["metadata"]["name"], kind="pod") is None, 120, "the trainer pod to go")
    env.wait_until(lambda: jobs.get(children["job"], kind="job") is None, 60, "the Job to go")
    env.wait_until(lambda: jobs.get(children["configMap"], kind="configmap") is None, 60, "the ConfigMap to go")
    assert not env.find_trainer_pids(jobs.namespace, pod["metadata"]["name"])


def test_operator_restart_mid_run_creates_no_second_job(jobs, operator):
    jobs.apply(env.sd_manifest("steady", jobs.bucket, steps=120, save_steps=40))  # ~10 s: still running when killed
    env.wait_until(lambda: step_of(jobs, "steady") >= 2, 300, "training under way")
    job_uid = training_jobs(jobs, "steady")[0]["metadata"]["uid"]
    operator.kill()  # SIGKILL: no goodbye, the lease is not released
    before = step_of(jobs, "steady")
    time.sleep(4)
    assert step_of(jobs, "steady") == before  # nobody updates status while the operator is down
    operator.start()  # waits until it holds the lease again
    env.wait_until(lambda: step_of(jobs, "steady") > before, 120, "status to move again")
    assert jobs.wait_condition("steady", "Succeeded", 400).returncode == 0
    (only,) = training_jobs(jobs, "steady")
    assert only["metadata"]["uid"] == job_uid
    status = jobs.status("steady")
    assert status["attempts"] == 1 and status["progress"]["step"] == 120
    assert operator.metric("lora_operator_reconcile_errors_total") == 0


def test_a_finished_job_is_never_brought_back(jobs):
    jobs.apply(env.llm_manifest("done", jobs.bucket, steps=4, save_steps=2))
    assert jobs.wait_condition("done", "Succeeded", 300).returncode == 0
    final = jobs.status("done")
    jobs.kubectl("delete", "job", final["children"]["job"], "--wait=true", "--timeout=60s")
    jobs.kubectl("delete", "configmap", final["children"]["configMap"])
    time.sleep(6)  # several poll intervals
    assert training_jobs(jobs, "done") == []
    assert jobs.get(final["children"]["configMap"], kind="configmap") is None
    assert jobs.status("done") == final


def test_cleanup_policy_deletes_the_outputs_with_the_job(jobs):
    jobs.apply(env.llm_manifest("scratch", jobs.bucket, steps=4, save_steps=2, cleanupPolicy="DeleteOutputs"))
    assert jobs.wait_condition("scratch", "Succeeded", 300).returncode == 0
    assert "out/scratch/pytorch_lora_weights.safetensors" in jobs.s3_keys("out/scratch/")
    assert "lora-operator.io/cleanup" in jobs.get("scratch")["metadata"].get("finalizers", [])
    uid = jobs.get("scratch")["metadata"]["uid"]
    assert json.loads(jobs.s3_bytes(f"s3://{jobs.bucket}/out/scratch/.lora-owner.json"))["owner"] == f"job:{uid}"
    # another run's outputs inside the prefix, with their own claim: never deleted with this job's
    theirs = {"owner": "job:another-uid", "name": "LoRATrainingJob team-b/nested (uid another-uid)"}
    client = jobs.s3.client()
    client.put_object(Bucket=jobs.bucket, Key="out/scratch/nested/.lora-owner.json", Body=json.dumps(theirs).encode())
    client.put_object(Bucket=jobs.bucket, Key="out/scratch/nested/pytorch_lora_weights.safetensors", Body=b"w")
    jobs.kubectl("delete", "ltj", "scratch", "--wait=false")
    env.wait_until(lambda: jobs.get("scratch") is None, 240, "the job to be deleted after its outputs")
    assert sorted(jobs.s3_keys("out/scratch/")) == [
        "out/scratch/nested/.lora-owner.json",
        "out/scratch/nested/pytorch_lora_weights.safetensors",
    ]
    assert jobs.s3_keys("data/")  # nothing else was touched
    events = {e["reason"]: e["message"] for e in jobs.events("scratch")}
    assert "DeletingOutputs" in events
    assert "nested/ belongs to LoRATrainingJob team-b/nested (uid another-uid); kept" in events["OutputsKept"]


def test_retain_policy_keeps_outputs_and_adds_no_finalizer(jobs):
    jobs.apply(env.llm_manifest("keeper", jobs.bucket, steps=2, save_steps=2))
    assert jobs.wait_condition("keeper", "Succeeded", 300).returncode == 0
    assert not jobs.get("keeper")["metadata"].get("finalizers")
    jobs.kubectl("delete", "ltj", "keeper", "--timeout=60s")
    assert "out/keeper/pytorch_lora_weights.safetensors" in jobs.s3_keys("out/keeper/")


def test_two_replicas_never_both_act(jobs, operator, operator_kubeconfig, tmp_path):
    standby = env.OperatorProcess(
        operator_kubeconfig, tmp_path, identity="operator-standby", env={k: v for k, v in operator.extra_env.items()}
    )
    standby.start(wait_ready=False)
    try:
        env.wait_until(lambda: "waits for the leader lease" in standby.log_tail(), 60, "the standby to wait")
        assert standby.metric("lora_operator_leader") == 0.0
        jobs.apply(env.llm_manifest("first", jobs.bucket, steps=2, save_steps=2))
        assert jobs.wait_condition("first", "Succeeded", 300).returncode == 0
        assert "first" not in standby.log_tail()  # only the leader acted
        operator.kill()  # the leader dies without releasing its lease
        standby.wait_ready(timeout=60)  # takes over once the lease expires (6 s here)
        assert "acquired the leader lease" in standby.log_tail()
        jobs.apply(env.llm_manifest("second", jobs.bucket, steps=2, save_steps=2))
        assert jobs.wait_condition("second", "Succeeded", 300).returncode == 0
        assert len(training_jobs(jobs, "second")) == 1
    finally:
        standby.stop()
        operator.ensure_running()
    # a clean shutdown releases the lease at once, so the fixture's operator led again without waiting
    assert "released the leader lease" in standby.log_tail()
