"""A tiny text-to-image and a tiny text-generation job, from `kubectl apply` to a trained LoRA in S3."""

import hashlib

import pytest

from tests.e2e import operator_env as env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def check_success(jobs, name, steps, save_steps, formats):
    status = jobs.status(name)
    assert status["phase"] == "Succeeded" and status["reason"] == "TrainingSucceeded"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Failed"]["status"] == "False"
    assert status["attempts"] == 1 and status["observedGeneration"] == 1
    assert status["progress"]["step"] == steps and status["progress"]["totalSteps"] == steps
    assert status["startTime"] <= status["completionTime"]
    # artifacts: the final weights, each with the sha256 of the object really in S3
    by_uri = {a["uri"]: a for a in status["artifacts"]}
    out = f"s3://{jobs.bucket}/out/{name}"
    assert f"{out}/pytorch_lora_weights.safetensors" in by_uri
    assert {a["format"] for a in status["artifacts"]} >= formats
    for artifact in status["artifacts"]:
        assert artifact["step"] == steps
        assert hashlib.sha256(jobs.s3_bytes(artifact["uri"])).hexdigest() == artifact["sha256"]
    # the output layout of docs/architecture.md
    keys = {k.removeprefix(f"out/{name}/") for k in jobs.s3_keys(f"out/{name}/")}
    for required in (
        "pytorch_lora_weights.safetensors",
        "config_backup.yaml",
        "checkpoints/pytorch_lora_weights_final.safetensors",
        f"checkpoints/pytorch_lora_weights_step_{save_steps}.safetensors",
        f"checkpoints/state_step_{save_steps}/manifest.json",
    ):
        assert required in keys, f"{required} missing from {sorted(keys)}"
    assert any(k.startswith("logs/") and "tfevents" in k for k in keys)
    # last checkpoint and events
    assert status["lastCheckpoint"]["uri"].startswith(f"{out}/checkpoints/state_step_")
    reasons = [e["reason"] for e in jobs.events(name)]
    for reason in ("AttemptStarted", "Training", "TrainingSucceeded"):
        assert reason in reasons
    assert "EXPERIMENT.md" in keys, "the run's record (docs/architecture.md output layout) did not reach S3"
    return status


def watch_progress(jobs, name, timeout=400):
    """The status.progress values, and the status.lastCheckpoint steps, seen while the job runs."""
    seen, checkpoints = [], []

    def done():
        status = jobs.status(name)
        progress, checkpoint = status.get("progress"), status.get("lastCheckpoint")
        if status.get("phase") == "Running" and progress and (not seen or seen[-1] != progress):
            seen.append(progress)
        if status.get("phase") == "Running" and checkpoint and checkpoint["step"] not in checkpoints:
            checkpoints.append(checkpoint["step"])
        return status.get("phase") in ("Succeeded", "Failed")

    env.wait_until(done, timeout, f"{name} to finish", interval=0.5)
    return seen, checkpoints


def test_text_to_image_job_succeeds(jobs, prometheus):
    # long enough (several seconds on CPU) for the operator's 1 s poll to see it mid-run more than once
    steps, save = 48, 16
    jobs.apply(
        env.sd_manifest(
            "sd-tiny", jobs.bucket, steps=steps, save_steps=save, output={"formats": ["diffusers", "kohya"]}
        )
    )
    pod = env.wait_until(lambda: jobs.running_pod("sd-tiny"), 240, "a running trainer pod")
    prometheus.set_targets([f"{pod['status']['podIP']}:9400"], labels={"namespace": jobs.namespace})
    seen, checkpoints = watch_progress(jobs, "sd-tiny")
    # progress was read from the metrics endpoint while the trainer ran: several distinct steps below the end
    running = [p for p in seen if 0 < p["step"] < steps]
    assert len({p["step"] for p in running}) >= 2, seen
    assert all({"step", "totalSteps", "epoch", "loss", "learningRate", "updatedAt"} <= set(p) for p in running)
    assert any("eta" in p for p in running), seen  # once a few steps have been timed
    # a checkpoint shows up in status while the run goes on (uploaded to S3, so a new pod could resume from it)
    assert checkpoints and set(checkpoints) <= {save, 2 * save}, checkpoints
    assert jobs.wait_condition("sd-tiny", "Succeeded", 60).returncode == 0
    check_success(jobs, "sd-tiny", steps, save, {"diffusers", "kohya"})
    # Prometheus scraped the same endpoint the operator reads (what Grafana shows)
    loss = prometheus.query(f'max_over_time(lora_train_loss{{job_name="sd-tiny",namespace="{jobs.namespace}"}}[10m])')
    assert loss and float(loss[0]["value"][1]) > 0


def test_auto_label_shows_as_the_labeling_phase_then_trains(jobs):
    import io

    from PIL import Image

    client = jobs.s3.client()
    for i in range(40):  # uncaptioned: the tiny BLIP captions them all (its loading alone takes seconds)
        image = io.BytesIO()
        Image.effect_noise((48, 48), 20 + i).convert("RGB").save(image, format="PNG")
        client.put_object(Bucket=jobs.bucket, Key=f"raw/img{i:02d}.png", Body=image.getvalue())
    jobs.apply(
        env.sd_manifest(
            "labeled",
            jobs.bucket,
            steps=4,
            save_steps=4,
            dataset={
                "uri": f"s3://{jobs.bucket}/raw",
                "resolution": 32,
                "autoLabel": True,
                "labelModel": "preset:tiny-blip",
            },
        )
    )
    labeling = jobs.wait_phase("labeled", "Labeling", 240)
    assert labeling["reason"] == "Labeling" and "of 40 done" in labeling["message"], labeling
    assert {c["type"]: c["status"] for c in labeling["conditions"]}["Running"] == "True"
    assert jobs.wait_condition("labeled", "Succeeded", 300).returncode == 0
    assert {"Labeling", "Training", "TrainingSucceeded"} <= {e["reason"] for e in jobs.events("labeled")}
    captions = jobs.s3_bytes(f"s3://{jobs.bucket}/out/labeled/metadata.csv").decode().splitlines()
    assert captions[0] == "file_name,text" and len(captions) == 41
    assert "raw/metadata.csv" not in {f"raw/{k}" for k in jobs.s3_keys("raw/")}  # the dataset is left as it was


def test_text_generation_job_succeeds_and_kubectl_wait_returns(jobs):
    steps, save = 8, 4
    jobs.apply(env.llm_manifest("llm-tiny", jobs.bucket, steps=steps, save_steps=save))
    waited = jobs.wait_condition("llm-tiny", "Succeeded", 400)
    assert waited.returncode == 0, waited.stderr
    assert "condition met" in waited.stdout
    status = check_success(jobs, "llm-tiny", steps, save, set())
    assert status["progress"]["loss"] > 0
    table = jobs.kubectl("get", "ltj", "llm-tiny").stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "STEP", "LOSS", "ETA", "AGE"]
    assert row.split()[:3] == ["llm-tiny", "Succeeded", str(steps)]


@pytest.mark.parametrize("family", ["flux1", "flux2", "sd3", "qwen-image", "z-image"])
def test_each_family_example_manifest_trains_tiny_through_the_operator(jobs, family):
    """examples/loratrainingjob-<family>.yaml as written, but on the family's tiny preset, the bundled images
    and a CPU: the CRD accepts it, the operator runs it, the trainer writes both formats to S3."""
    from pathlib import Path

    import yaml

    example = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "examples" / f"loratrainingjob-{family}.yaml").read_text()
    )
    name = f"example-{family}"
    tiny = {
        "baseModel": f"preset:tiny-{family}",
        "dataset": {"uri": f"s3://{jobs.bucket}/data/images", "resolution": 16, "bucketing": None},
        "training": {"steps": 4, "batchSize": 2, "learningRate": 1e-3},
        "validation": {"inferenceSteps": 2},
        "output": {"uri": f"s3://{jobs.bucket}/out/{name}", "saveSteps": 2},
        "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
        "s3": None,
    }
    manifest = env._merge({**example, "metadata": {"name": name}}, {"spec": tiny})
    jobs.apply(manifest)
    assert jobs.wait_condition(name, "Succeeded", 400).returncode == 0, jobs.status(name)
    check_success(jobs, name, 4, 2, {"diffusers", "kohya"})
    keys = {k.removeprefix(f"out/{name}/") for k in jobs.s3_keys(f"out/{name}/")}
    assert f"{name}.kohya.safetensors" in keys and "samples/step_4_0.png" in keys
