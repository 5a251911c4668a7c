"""Faults of the cluster under a running job: an API server outage and a node crash (issue 14).

Each ends Succeeded with the weights of an undisturbed run of the same manifest (same seed: bit-equal).
"""

import os
import re
import signal
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import plugin
from tests.e2e import operator_env as env
from tests.e2e.test_failures import final_weights
from tests.e2e.test_lifecycle import step_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS, SAVE = 40, 8  # several checkpoints; the trainer is paused at the first one, so at any CPU speed
# the fault lands mid-run
# The API server stays down at least this long, and until the trainer has moved on meanwhile.
OUTAGE_SECONDS = 15
ERRORS = "lora_operator_reconcile_errors_total"
TRAINER_METRICS_PORT = 9400  # the operator's default (settings.trainer_metrics_port)


def newest_checkpoint(jobs, name):
    """The step of the newest complete checkpoint of a job on S3 (0 when none); read from S3, not the API."""
    keys = jobs.s3_keys(f"out/{name}/checkpoints/")
    return max((int(m[1]) for k in keys if (m := re.search(r"state_step_(\d+)/manifest\.json$", k))), default=0)


def pause_at_first_checkpoint(jobs, name, timeout=300):
    """Wait until the job's first checkpoint is on S3, then SIGSTOP its trainer; returns (pod, pids).

    The pause pins the fault between two checkpoints whatever the CPU speed (a tiny run takes seconds on an
    idle machine, minutes on a busy one); the caller resumes (SIGCONT) or kills the trainer."""

    def trainer():
        pod = jobs.running_pod(name)
        if pod is None or newest_checkpoint(jobs, name) < SAVE:
            return None
        pids = env.find_trainer_pids(jobs.namespace, pod["metadata"]["name"])
        return (pod, pids) if pids else None

    pod, pids = env.wait_until(trainer, timeout, f"{name}'s first checkpoint", interval=0.3)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pod, pids


def trainer_step(agent, namespace, pod_name):
    """The step the trainer serves on its own /metrics (no API server involved); None when it does not answer."""
    try:
        url = f"http://{agent.pod_ip(namespace, pod_name)}:{TRAINER_METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    steps = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "lora_train_step"]
    return int(steps[0]) if steps else None


def finished(jobs, name):
    """Whether the job's final weights are on S3 (no API server involved)."""
    return bool(jobs.s3_keys(f"out/{name}/pytorch_lora_weights.safetensors"))


def assert_same_weights(jobs, name, reference):
    ours, theirs = final_weights(jobs, jobs.status(name)), final_weights(jobs, jobs.status(reference))
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{name}'s weights differ from the undisturbed run in {len(different)} tensors"


def assert_finished_whole(jobs, name):
    """Succeeded at the last step, with its weights among the artifacts and its last checkpoint named."""
    status = jobs.status(name)
    assert (status["phase"], status["progress"]["step"]) == ("Succeeded", STEPS)
    assert any(a["uri"].endswith(f"/out/{name}/pytorch_lora_weights.safetensors") for a in status["artifacts"])
    assert status["lastCheckpoint"]["step"] >= STEPS - SAVE
    return status


def test_api_server_outage_mid_run_ends_with_the_weights_of_an_undisturbed_run(
    jobs, kube_cluster, node_agent, operator, operator_kubeconfig, tmp_path
):
    """kube-apiserver is stopped for >= 15 s while a job trains, then started again on the same port.

    The trainer needs no API server and trains on (it may even finish meanwhile). The operator rides the outage
    out in the same process: its requests fail meanwhile (each failed reconcile is counted, as it should be:
    they did fail), then kopf's watches reconnect (the reference job is created only after the outage, so it
    is seen through the reconnected LoRATrainingJob watch alone) and the job is followed to the end, with no
    error after the outage. This replica runs without leader election: with a Lease (15 s by default, 6 s in
    these tests) an outage longer than 2/3 of it ends the leader on purpose (exit 1, restarted by its
    Deployment), and that path is test_lifecycle's operator restart.
    """
    operator.stop()  # releases the Lease; the fixture's operator is started again at the end
    solo = env.OperatorProcess(
        operator_kubeconfig,
        tmp_path,
        identity="operator-solo",
        env={**operator.extra_env, "LORA_OPERATOR_LEADER_ELECTION": "false"},
    )
    plugin._running.append(solo)  # its log in a failure report
    try:
        solo.start()
        jobs.apply(env.sd_manifest("outage", jobs.bucket, steps=STEPS, save_steps=SAVE))
        pod, pids = pause_at_first_checkpoint(jobs, "outage")
        pod_name = pod["metadata"]["name"]
        assert solo.metric(ERRORS) == 0
        seen = step_of(jobs, "outage")  # the last step the operator saw before the outage

        kube_cluster.stop_apiserver()
        try:
            down = time.monotonic()
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

            def trained():  # the trainer's own step, or STEPS once its final weights are on S3
                return trainer_step(node_agent, jobs.namespace, pod_name) or (STEPS if finished(jobs, "outage") else 0)

            at = env.wait_until(trained, 60, "the trainer's step")
            env.wait_until(lambda: trained() > at or at == STEPS, 120, "the trainer to train on without the API server")
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down)))
            assert solo.running, solo.log_tail()
        finally:
            kube_cluster.start_apiserver()
        outage = time.monotonic() - down

        env.wait_until(lambda: step_of(jobs, "outage") > seen, 120, "status to move again after the outage")
        during = solo.metric(ERRORS)
        jobs.apply(env.sd_manifest("reference", jobs.bucket, steps=STEPS, save_steps=SAVE))  # undisturbed
        assert jobs.wait_condition("outage", "Succeeded", 600).returncode == 0, jobs.status("outage")
        assert jobs.wait_condition("reference", "Succeeded", 600).returncode == 0, jobs.status("reference")

        status = assert_finished_whole(jobs, "outage")
        assert status["attempts"] == 1 and len(jobs.pods("outage")) == 1  # the trainer was never restarted
        assert_same_weights(jobs, "outage", "reference")
        # one process throughout; reconciles failed only while the API server was away
        assert solo.running and solo.starts == 1
        assert solo.metric(ERRORS) == during, f"{during} errors in the {outage:.0f} s outage, more after it"
        print(f"outage {outage:.1f} s, {during:.0f} failed reconciles in it, status step {seen} before it")
    finally:
        plugin._running.remove(solo)
        solo.stop()
        operator.ensure_running()


def test_node_crash_mid_run_resumes_on_the_other_node_with_the_weights_of_an_undisturbed_run(
    jobs, node_agent, second_node, operator
):
    """The node under a training pod crashes (processes killed, no more heartbeats) and is declared gone
    (Kubernetes' non-graceful node shutdown: the out-of-service taint). The node controller marks it NotReady,
    the taint evicts the pod (DisruptionTarget), the pod garbage collector fails it, and the Job controller
    replaces it on the other node, where the trainer resumes from the newest checkpoint on S3. backoffLimit 0:
    the disruption is not counted as a failure."""
    errors = operator.metric(ERRORS)
    jobs.apply(env.sd_manifest("crashed", jobs.bucket, steps=STEPS, save_steps=SAVE, backoffLimit=0))
    first = env.wait_until(
        lambda: next((p for p in jobs.pods("crashed") if p["spec"].get("nodeName")), None), 300, "a scheduled pod"
    )
    agents = {a.name: a for a in (node_agent, second_node)}
    victim = agents.pop(first["spec"]["nodeName"])
    (survivor,) = agents.values()
    # the undisturbed run, kept off the node that will crash
    jobs.apply(
        env.sd_manifest(
            "reference",
            jobs.bucket,
            steps=STEPS,
            save_steps=SAVE,
            resources={"nodeSelector": {"kubernetes.io/hostname": survivor.name}},
        )
    )
    pause_at_first_checkpoint(jobs, "crashed")
    crashed_at = time.monotonic()
    victim.crash()  # kills the (paused) trainer; returns once the node controller has the node NotReady
    victim.mark_out_of_service()

    lost = first["metadata"]["name"]
    replacement = env.wait_until(
        lambda: next(
            (p for p in jobs.pods("crashed") if p["metadata"]["name"] != lost and p["spec"].get("nodeName")), None
        ),
        180,
        "a replacement pod",
    )
    replaced_after = time.monotonic() - crashed_at
    assert replacement["spec"]["nodeName"] == survivor.name
    assert jobs.wait_condition("crashed", "Succeeded", 600).returncode == 0, jobs.status("crashed")
    assert jobs.wait_condition("reference", "Succeeded", 600).returncode == 0, jobs.status("reference")

    status = assert_finished_whole(jobs, "crashed")
    assert status["attempts"] == 2
    training_job = jobs.get(status["children"]["job"], kind="job")
    assert (training_job["status"].get("failed") or 0) == 0  # a disruption, not a failure (backoffLimit 0)
    assert jobs.get(lost, kind="pod") is None  # failed and removed by the control plane
    log = jobs.kubectl("logs", replacement["metadata"]["name"]).stdout
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert resumed and int(resumed[0].rsplit("at step", 1)[1].split()[0]) >= SAVE
    assert "Evicted" in {e["reason"] for e in jobs.events("crashed")}
    assert_same_weights(jobs, "crashed", "reference")
    assert operator.metric(ERRORS) == errors
    print(f"replacement pod {replaced_after:.1f} s after the crash; {resumed[0].strip()}")
    victim.recover()
