"""lora-train against the real SeaweedFS: datasets from S3, every output to S3, resume after SIGTERM from
S3 on a fresh disk, a 60 s outage mid-run, hostile keys, bad credentials, restartable downloads."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from safetensors.torch import load as load_safetensors

from lora_trainer.cli import main
from lora_trainer.errors import ExitCode, OutputError, StorageError
from lora_trainer.storage.client import Retry
from lora_trainer.storage.download import Downloader
from lora_trainer.storage.store import Store
from lora_trainer.storage.uri import S3Uri
from tests.integration.trainer_world import (
    SAMPLE,
    ListingRewriter,
    TrainerProcess,
    can_mount_tmpfs,
    files_under,
    get_bytes,
    list_keys,
    sd_config,
    termination_message,
    upload_folder,
    write_config,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS environment pointing at SeaweedFS, for in-process runs; returned for subprocesses."""
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def dataset(s3_server, s3_bucket):
    upload_folder(s3_server.client(), s3_bucket, "datasets/shapes", SAMPLE / "images")
    return f"s3://{s3_bucket}/datasets/shapes"


def run_inprocess(tmp_path, config: dict) -> tuple[int, dict]:
    code = main(["--config", str(write_config(tmp_path, config))])
    return code, termination_message(config)


def assert_same_weights(a: bytes, b: bytes) -> None:
    x, y = load_safetensors(a), load_safetensors(b)
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].equal(y[key]), f"{key} differs"


def seconds_per_step(log: str) -> float:
    """The median time between two step lines (logging_steps=1) of a trainer log."""
    times = [
        sum(int(x) * f for x, f in zip(m.group(1).split(":"), (3600, 60, 1)))
        for m in re.finditer(r"^(\d\d:\d\d:\d\d) lora-train INFO step \d+/", log, re.M)
    ]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return float(gaps[len(gaps) // 2]) + 1.0 if gaps else 1.0  # +1: the log has whole seconds


# -- a run in S3
def test_a_run_reads_its_dataset_from_s3_and_writes_every_output_to_s3(tmp_path, s3_server, s3_bucket, s3_env, dataset):
    client = s3_server.client()
    config = sd_config(tmp_path, s3_bucket, max_train_steps=6, save_steps=2, keep_checkpoints=1)
    code, message = run_inprocess(tmp_path, config)
    assert code == ExitCode.OK, message

    remote = list_keys(client, s3_bucket, "runs/shapes")
    local = files_under(tmp_path / "cache" / "runs" / s3_bucket / "runs" / "shapes")  # the working copy
    events = {k for k in remote if k.startswith("logs/events.out.tfevents.")}
    required = {
        "config_backup.yaml",
        "pytorch_lora_weights.safetensors",
        "checkpoints/pytorch_lora_weights_final.safetensors",
        "checkpoints/pytorch_lora_weights_step_4.safetensors",
        "checkpoints/state_step_4/manifest.json",
        "checkpoints/state_step_4/optimizer.safetensors",
        "checkpoints/state_step_4/rng.safetensors",
        "checkpoints/state_step_4/state.json",
    }
    assert len(events) == 1 and required <= remote
    # every output reached S3, and nothing else did: no step 2 (keep 1), no temp files; and the owner marker
    assert remote == local | {".lora-owner.json"}
    assert not {k for k in remote if "step_2" in k}

    backup = yaml.safe_load(get_bytes(client, f"s3://{s3_bucket}/runs/shapes/config_backup.yaml"))
    assert backup["train_data_dir"] == dataset and backup["output_dir"] == f"s3://{s3_bucket}/runs/shapes"
    assert backup["resume"] == "latest"  # the default for an s3:// output

    assert message["status"] == "succeeded" and message["step"] == 6 and message["exitCode"] == 0
    assert message["lastCheckpoint"] == {"step": 4, "uri": f"s3://{s3_bucket}/runs/shapes/checkpoints/state_step_4"}
    main_weights = message["artifacts"][0]
    assert main_weights["uri"] == f"s3://{s3_bucket}/runs/shapes/pytorch_lora_weights.safetensors"
    for artifact in message["artifacts"]:
        assert hashlib.sha256(get_bytes(client, artifact["uri"])).hexdigest() == artifact["sha256"]

    # the finished prefix is never overwritten by accident...
    code, message = run_inprocess(tmp_path, config)
    assert code == ExitCode.STORAGE_INVALID
    assert message["reason"] == "StorageInvalid" and message["permanent"] is True
    assert "holds a finished run" in message["error"] and "overwrite: true" in message["error"]
    assert list_keys(client, s3_bucket, "runs/shapes") == remote
    # ...only on purpose: the earlier run's files go, a user's file stays
    client.put_object(Bucket=s3_bucket, Key="runs/shapes/NOTES.md", Body=b"mine")
    code, _ = run_inprocess(tmp_path, {**config, "overwrite": True, "max_train_steps": 2, "save_steps": 0})
    assert code == ExitCode.OK
    after = list_keys(client, s3_bucket, "runs/shapes")
    assert "NOTES.md" in after and not {k for k in after if k.startswith("checkpoints/state_step_")}


def test_validation_data_on_s3_is_downloaded_like_the_training_data(tmp_path, s3_server, s3_bucket, s3_env):
    upload_folder(s3_server.client(), s3_bucket, "datasets/text", SAMPLE / "text")
    config = {
        "task_type": "text-generation",
        "base_model": "preset:tiny-llm",
        "train_data_dir": f"s3://{s3_bucket}/datasets/text/arithmetic.jsonl",
        "validation_data": f"s3://{s3_bucket}/datasets/text/chat.jsonl",
        "validation_steps": 1,
        "max_seq_length": 64,
        "max_train_steps": 2,
        "save_steps": 0,
        "output_dir": str(tmp_path / "out"),
        "s3_cache_dir": str(tmp_path / "cache"),
        "termination_message_path": str(tmp_path / "termination-log"),
    }
    code, message = run_inprocess(tmp_path, config)
    assert code == ExitCode.OK, message
    assert (tmp_path / "cache" / "s3" / s3_bucket / "datasets" / "text" / "chat.jsonl").is_file()
    assert "| Final validation loss |" in (tmp_path / "out" / "EXPERIMENT.md").read_text()
    backup = yaml.safe_load((tmp_path / "out" / "config_backup.yaml").read_text())
    assert backup["validation_data"] == config["validation_data"]  # the record names S3, not the cache

    missing = {**config, "validation_data": f"s3://{s3_bucket}/datasets/text/nothing.jsonl", "overwrite": True}
    code, message = run_inprocess(tmp_path, missing)
    assert code == ExitCode.DATASET_INVALID and "nothing.jsonl: no such object or prefix" in message["error"]


# -- one owner per output prefix
def as_job(monkeypatch, uid: str) -> None:
    monkeypatch.setenv("LORA_JOB_UID", uid)
    monkeypatch.setenv("LORA_JOB_NAME", f"job-{uid}")
    monkeypatch.setenv("LORA_JOB_NAMESPACE", "team-a")


def test_a_second_job_on_the_same_prefix_is_refused_naming_the_owner(
    tmp_path, s3_server, s3_bucket, s3_env, dataset, monkeypatch
):
    client = s3_server.client()
    as_job(monkeypatch, "aaa")
    config = sd_config(tmp_path, s3_bucket, max_train_steps=4, save_steps=2)
    code, message = run_inprocess(tmp_path, config)
    assert code == ExitCode.OK, message
    owned = {
        k: get_bytes(client, f"s3://{s3_bucket}/runs/shapes/{k}") for k in list_keys(client, s3_bucket, "runs/shapes")
    }
    assert json.loads(owned[".lora-owner.json"])["owner"] == "job:aaa"

    # another job, even one that would resume rather than overwrite, writes nothing
    as_job(monkeypatch, "bbb")
    code, message = run_inprocess(tmp_path, {**config, "resume": "latest"})
    assert code == ExitCode.STORAGE_INVALID and message["permanent"] is True
    assert (
        f"output_dir s3://{s3_bucket}/runs/shapes belongs to LoRATrainingJob team-a/job-aaa (uid aaa)"
        in message["error"]
    )
    assert "this is LoRATrainingJob team-a/job-bbb (uid bbb)" in message["error"]
    assert {k: get_bytes(client, f"s3://{s3_bucket}/runs/shapes/{k}") for k in owned} == owned
    assert list_keys(client, s3_bucket, "runs/shapes") == set(owned)

    # the same job's next attempt is the same owner: it resumes (from step 2, its final weights removed)
    as_job(monkeypatch, "aaa")
    client.delete_object(Bucket=s3_bucket, Key="runs/shapes/pytorch_lora_weights.safetensors")
    code, message = run_inprocess(tmp_path, config)
    assert code == ExitCode.OK, message

    # overwrite: true takes the prefix over
    as_job(monkeypatch, "bbb")
    code, message = run_inprocess(tmp_path, {**config, "overwrite": True})
    assert code == ExitCode.OK, message
    assert json.loads(get_bytes(client, f"s3://{s3_bucket}/runs/shapes/.lora-owner.json"))["owner"] == "job:bbb"


def claim_at_once(store, out, owners) -> dict[str, str]:
    """Each owner claims `out` in its own thread, all released at the same moment: owner id -> 'won' or why not."""
    from lora_trainer.storage.stage import claim_prefix

    start, results = threading.Barrier(len(owners)), {}

    def claim(owner):
        start.wait()
        try:
            claim_prefix(store, out, owner, overwrite=False)
            results[owner.id] = "won"
        except StorageError as err:
            results[owner.id] = str(err)

    threads = [threading.Thread(target=claim, args=(o,)) for o in owners]
    [t.start() for t in threads], [t.join() for t in threads]
    return results


def test_of_runs_claiming_one_prefix_at_once_exactly_one_wins(s3_server, s3_bucket):
    from lora_trainer.ownership import Owner

    store = Store(s3_server.client(), Retry(seconds=10))
    for attempt in range(5):
        out = S3Uri.parse(f"s3://{s3_bucket}/race-{attempt}")
        results = claim_at_once(store, out, [Owner(f"job:{i}", f"job {i}") for i in range(4)])
        winners = [o for o, r in results.items() if r == "won"]
        assert len(winners) == 1, results
        held = json.loads(store.get_bytes(out.child(".lora-owner.json")))["owner"]
        assert held == winners[0]
        assert all(f"belongs to job {held[4:]} " in r for o, r in results.items() if o != held), results
    store.close()


def test_a_local_output_dir_has_one_owner_too(tmp_path, monkeypatch, capsys):
    as_job(monkeypatch, "aaa")
    config = sd_config(tmp_path, None, max_train_steps=2, save_steps=0)
    code, message = run_inprocess(tmp_path, config)
    assert code == ExitCode.OK, message
    as_job(monkeypatch, "bbb")
    code, message = run_inprocess(tmp_path, {**config, "overwrite": False, "resume": "latest"})
    assert code == ExitCode.STORAGE_INVALID and "belongs to LoRATrainingJob team-a/job-aaa" in message["error"]
    assert json.loads((tmp_path / "out" / ".lora-owner.json").read_text())["owner"] == "job:aaa"


def test_auto_label_of_an_s3_dataset_keeps_its_captions_in_the_output_on_s3(tmp_path, s3_server, s3_bucket, s3_env):
    client = s3_server.client()
    uncaptioned = tmp_path / "images"
    shutil.copytree(SAMPLE / "images", uncaptioned)
    (uncaptioned / "metadata.csv").unlink()
    (uncaptioned / "red_square.txt").write_text("my own caption, kept\n")
    upload_folder(client, s3_bucket, "datasets/shapes", uncaptioned)
    dataset_keys = list_keys(client, s3_bucket, "datasets/shapes")
    config = sd_config(
        tmp_path, s3_bucket, max_train_steps=2, save_steps=0, auto_label=True, label_model="preset:tiny-blip"
    )
    code, message = run_inprocess(tmp_path, config)
    assert code == ExitCode.OK, message

    captions = get_bytes(client, f"s3://{s3_bucket}/runs/shapes/metadata.csv").decode()
    rows = dict(csv.reader(io.StringIO(captions)))
    assert len(rows) == 9 and rows["red_square.png"] == "my own caption, kept"  # header + 8 images
    assert all(rows[name] for name in rows)
    # neither the dataset on S3 nor its cached copy (shared by later runs) was written
    assert list_keys(client, s3_bucket, "datasets/shapes") == dataset_keys
    assert not list((tmp_path / "cache").rglob("datasets/shapes/metadata.csv"))
    record = get_bytes(client, f"s3://{s3_bucket}/runs/shapes/EXPERIMENT.md").decode()
    assert f"`s3://{s3_bucket}/datasets/shapes`" in record  # the dataset as the user named it, not the cache
    assert "auto_label: 7 captioned by preset:tiny-blip (in output_dir/metadata.csv)" in record

    # a later attempt (an empty working copy, as on a new pod) fetches those captions instead of captioning
    code, message = run_inprocess(tmp_path, {**config, "overwrite": True, "label_model": "no-org/never-loaded"})
    assert code == ExitCode.OK, message
    record = get_bytes(client, f"s3://{s3_bucket}/runs/shapes/EXPERIMENT.md").decode()
    assert "auto_label: 0 captioned by no-org/never-loaded, 7 from an earlier attempt" in record
    assert get_bytes(client, f"s3://{s3_bucket}/runs/shapes/metadata.csv").decode() == captions


def test_sigterm_uploads_a_checkpoint_and_a_new_pod_resumes_from_s3_bit_for_bit(
    tmp_path, s3_server, s3_bucket, s3_env, dataset
):
    client = s3_server.client()
    # 30 steps: a couple of seconds left after step 2 for the SIGTERM to land mid-run
    settings = dict(max_train_steps=30, save_steps=10, logging_steps=1, sigterm_grace_seconds=20)
    straight = TrainerProcess(
        tmp_path,
        sd_config(tmp_path / "pod0", s3_bucket, output_dir=f"s3://{s3_bucket}/straight", **settings),
        s3_env,
        "straight",
    )
    first = sd_config(tmp_path / "pod1", s3_bucket, **settings)
    stopped = TrainerProcess(tmp_path, first, s3_env, "first")
    try:
        stopped.wait_for_output("step 2/30")
        stopped.proc.send_signal(signal.SIGTERM)
        assert stopped.wait(120) == ExitCode.INTERRUPTED == 143, stopped.output()[-3000:]
        assert straight.wait(600) == 0, straight.output()[-3000:]
    finally:
        stopped.kill(), straight.kill()
    message = termination_message(first)
    step = message["lastCheckpoint"]["step"]
    assert message["status"] == "interrupted" and message["reason"] == "Interrupted" and not message["permanent"]
    assert 3 <= step < 30 and "error" not in message
    assert message["lastCheckpoint"]["uri"] == f"s3://{s3_bucket}/runs/shapes/checkpoints/state_step_{step}"
    interrupted = list_keys(client, s3_bucket, "runs/shapes")
    assert f"checkpoints/state_step_{step}/manifest.json" in interrupted
    assert "pytorch_lora_weights.safetensors" not in interrupted  # not finished: no marker
    # synced during the run, not only at the end of a finished one
    assert {"config_backup.yaml", "EXPERIMENT.md"} <= interrupted
    assert any(k.startswith("logs/events.out.tfevents.") for k in interrupted)

    second = sd_config(tmp_path / "pod2", s3_bucket, **settings)  # a new pod: an empty disk, S3 only
    resumed = TrainerProcess(tmp_path, second, s3_env, "second")
    try:
        assert resumed.wait(600) == 0, resumed.output()[-3000:]
    finally:
        resumed.kill()
    assert f"at step {step}" in resumed.output() and "resumed from" in resumed.output()
    assert termination_message(second)["status"] == "succeeded"
    assert_same_weights(
        get_bytes(client, f"s3://{s3_bucket}/runs/shapes/pytorch_lora_weights.safetensors"),
        get_bytes(client, f"s3://{s3_bucket}/straight/pytorch_lora_weights.safetensors"),
    )


def test_a_corrupt_newest_checkpoint_on_s3_falls_back_to_an_older_one(
    tmp_path, s3_server, s3_bucket, s3_env, dataset, capfd
):
    client, run = s3_server.client(), f"s3://{s3_bucket}/runs/shapes"
    config = sd_config(tmp_path, s3_bucket, max_train_steps=8, save_steps=2, keep_checkpoints=None)
    code, message = run_inprocess(tmp_path, config)
    assert code == ExitCode.OK, message
    undisturbed = get_bytes(client, f"{run}/pytorch_lora_weights.safetensors")
    # a pod that died after its last step but before the run finished...
    client.delete_object(Bucket=s3_bucket, Key="runs/shapes/pytorch_lora_weights.safetensors")
    # ...whose newest checkpoint was damaged on S3 (same size), and the one before given a hostile manifest
    key = "runs/shapes/checkpoints/state_step_6/optimizer.safetensors"
    data = bytearray(get_bytes(client, f"s3://{s3_bucket}/{key}"))
    data[-1] ^= 0xFF
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))
    manifest = json.loads(get_bytes(client, f"{run}/checkpoints/state_step_4/manifest.json"))
    manifest["files"]["../../../../escaped.txt"] = {"size": 1, "sha256": "0" * 64}
    client.put_object(
        Bucket=s3_bucket, Key="runs/shapes/checkpoints/state_step_4/manifest.json", Body=json.dumps(manifest)
    )

    capfd.readouterr()
    code, message = run_inprocess(tmp_path, config)
    log = capfd.readouterr().err
    assert code == ExitCode.OK, message
    assert "checkpoint 6 is corrupt (state_step_6/optimizer.safetensors does not match its checksum)" in log
    assert "checkpoint 4 cannot be resumed from: its manifest.json lists other files" in log
    assert "resumed from" in log and "state_step_2 at step 2" in log
    assert_same_weights(get_bytes(client, f"{run}/pytorch_lora_weights.safetensors"), undisturbed)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_sigterm_during_an_s3_outage_exits_within_the_grace_period(tmp_path, s3_server, s3_bucket, s3_env, dataset):
    client = s3_server.client()
    config = sd_config(tmp_path, s3_bucket, max_train_steps=200, save_steps=2, logging_steps=1, sigterm_grace_seconds=5)
    run = TrainerProcess(tmp_path, config, s3_env, "grace")
    try:
        deadline = time.monotonic() + 300
        while "checkpoints/state_step_2/manifest.json" not in list_keys(client, s3_bucket, "runs/shapes"):
            assert run.proc.poll() is None and time.monotonic() < deadline, run.output()[-3000:]
            time.sleep(0.2)
        s3_server.stop()
        run.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = run.wait(120)
        elapsed = time.monotonic() - signalled
    finally:
        run.kill()
        s3_server.start()
    assert code == ExitCode.INTERRUPTED, run.output()[-3000:]
    step = seconds_per_step(run.output())  # the step under way when SIGTERM came is finished first
    assert elapsed < 5 + 2 * step + 10, f"exit took {elapsed:.1f} s after SIGTERM with a 5 s grace period"
    message = termination_message(config)
    assert message["status"] == "interrupted" and "grace period" in message["error"]
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)", run.output()).group(1))
    remote = list_keys(client, s3_bucket, "runs/shapes")
    last = message["lastCheckpoint"]["step"]
    assert 2 <= last < stopped_at  # the newest checkpoint that reached S3, not the one that could not
    assert f"checkpoints/state_step_{last}/manifest.json" in remote
    assert f"checkpoints/state_step_{stopped_at}/manifest.json" not in remote


@pytest.mark.slow
def test_an_s3_outage_of_60_seconds_mid_run_loses_no_checkpoint(tmp_path, s3_server, s3_bucket, s3_env, dataset):
    client = s3_server.client()
    config = sd_config(tmp_path, s3_bucket, max_train_steps=30, save_steps=3, s3_upload_queue=2, logging_steps=1)
    run = TrainerProcess(tmp_path, config, s3_env, "outage")
    try:
        deadline = time.monotonic() + 300
        while "checkpoints/state_step_3/manifest.json" not in list_keys(client, s3_bucket, "runs/shapes"):
            assert run.proc.poll() is None and time.monotonic() < deadline, run.output()[-3000:]
            time.sleep(0.2)
        s3_server.stop()
        down = time.monotonic()
        time.sleep(60)
        assert run.proc.poll() is None, "the run gave up during the outage:\n" + run.output()[-3000:]
        s3_server.start()
        up = time.monotonic()
        assert run.wait(600) == 0, run.output()[-3000:]
    finally:
        run.kill()
    assert up - down >= 60
    assert "retrying in" in run.output()  # it noticed the outage
    remote = list_keys(client, s3_bucket, "runs/shapes")
    for step in range(3, 30, 3):
        assert f"checkpoints/state_step_{step}/manifest.json" in remote, f"checkpoint {step} lost"
        assert f"checkpoints/pytorch_lora_weights_step_{step}.safetensors" in remote
    assert "pytorch_lora_weights.safetensors" in remote
    assert termination_message(config)["status"] == "succeeded"


# -- hostile keys
@pytest.mark.parametrize(
    "key",
    ["DOTDOT/DOTDOT/escaped.png", "%2e%2e/%2e%2e/escaped.png", "\uff0e\uff0e/escaped.png"],
    ids=["dot-dot", "percent-encoded", "fullwidth"],
)
def test_a_dataset_key_that_would_escape_the_cache_is_refused(tmp_path, s3_server, s3_bucket, s3_env, dataset, key):
    client = s3_server.client()
    with pytest.raises(ClientError):  # SeaweedFS refuses a literal `..` key; AWS S3 stores it
        client.put_object(Bucket=s3_bucket, Key="datasets/shapes/../escaped.png", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key=f"datasets/shapes/{key}", Body=b"\x89PNG escaped")
    proxy = ListingRewriter(s3_server.endpoint_url)
    try:  # the config key wins over AWS_ENDPOINT_URL_S3 (which points at SeaweedFS directly)
        config = sd_config(tmp_path / "pod", s3_bucket, s3_endpoint_url=proxy.url)
        code, message = run_inprocess(tmp_path, config)
    finally:
        proxy.shutdown()
    assert code == ExitCode.DATASET_INVALID
    assert message["reason"] == "DatasetInvalid" and message["permanent"] is True
    assert "refusing object key" in message["error"] and "Nothing was downloaded" in message["error"]
    assert [p for p in tmp_path.rglob("*") if p.is_file() and "escaped" in p.name] == []
    assert not (tmp_path / "pod" / "cache" / "s3").exists() or not any(
        p.is_file() for p in (tmp_path / "pod" / "cache" / "s3").rglob("*")
    )  # not one object fetched
    assert list_keys(client, s3_bucket, "runs/shapes") == set()  # and no output started


# -- credentials
@pytest.mark.parametrize("problem", ["wrong-secret", "missing-bucket"])
def test_wrong_credentials_or_a_missing_bucket_fail_fast_and_permanently(
    tmp_path, s3_bucket, s3_env, dataset, monkeypatch, capfd, problem
):
    secret = "not-the-secret-Zq93kdL"
    if problem == "wrong-secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        config = sd_config(tmp_path, s3_bucket)
    else:
        config = sd_config(tmp_path, s3_bucket, output_dir="s3://no-such-bucket-here/runs/x")
    started = time.monotonic()
    code, message = run_inprocess(tmp_path, config)
    assert time.monotonic() - started < 15  # no retrying a permanent error, no model loaded first
    assert code == ExitCode.STORAGE_INVALID == 6
    assert message["reason"] == "StorageInvalid" and message["permanent"] is True
    expected = "wrong credentials or no permission" if problem == "wrong-secret" else "the bucket does not exist"
    assert expected in message["error"]
    printed = "".join(capfd.readouterr())
    assert "lora-train ERROR" in printed  # the log was captured: the secrets' absence below means something
    assert secret not in str(message) and secret not in printed
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in str(message) + printed


def test_no_planted_secret_reaches_any_output_or_s3_object(
    tmp_path, s3_server, s3_bucket, s3_env, dataset, capfd, monkeypatch
):
    """Secrets in the endpoint URL, the environment and the user's own text: grepped for in every file the
    run wrote (binary ones too: TensorBoard events, safetensors metadata) and every object on S3."""
    password, token = "Pl4nted-Passw0rd", "hf_Pl4ntedT0kenValue"
    monkeypatch.setenv("HF_TOKEN", token)
    endpoint = s3_server.endpoint_url.replace("http://", f"http://planted:{password}@")
    config = sd_config(
        tmp_path,
        s3_bucket,
        s3_endpoint_url=endpoint,
        validation_prompts=[f"a red circle {token}"],
        validation_steps=2,
        save_formats=["diffusers", "kohya"],
    )
    path = write_config(tmp_path, config)
    assert main(["--config", str(path), "--set", f"description=trained with {token}"]) == ExitCode.OK
    planted = [password.encode(), token.encode(), s3_env["AWS_SECRET_ACCESS_KEY"].encode()]
    printed = "".join(capfd.readouterr())
    assert "planted:***@" in printed or "lora-train INFO" in printed  # the log was captured
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != path]
    objects = {
        k: get_bytes(s3_server.client(), f"s3://{s3_bucket}/runs/shapes/{k}")
        for k in list_keys(s3_server.client(), s3_bucket, "runs/shapes")
    }
    assert "config_backup.yaml" in objects and any(k.startswith("logs/") for k in objects) and len(written) > 20
    for secret in planted:
        assert secret.decode() not in printed
        assert [p for p in written if secret in p.read_bytes()] == []
        assert [k for k, body in objects.items() if secret in body] == []
    backup = yaml.safe_load(objects["config_backup.yaml"])
    assert backup["s3_endpoint_url"] == endpoint.replace(f"planted:{password}@", "***@")
    assert backup["description"] == "trained with ***"


# -- downloads
def test_downloads_are_verified_incremental_and_survive_a_restart_half_way(tmp_path, s3_server, s3_bucket):
    client = s3_server.client()
    blobs = {f"data/part-{i:02d}.bin": os.urandom(1000 + 7919 * i) for i in range(24)}
    for key, body in blobs.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    big = os.urandom(12 * 1024 * 1024 + 5)
    (tmp_path / "big").write_bytes(big)
    client.upload_file(
        str(tmp_path / "big"),
        s3_bucket,
        "data/big.safetensors",
        Config=TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20),
    )
    blobs["data/big.safetensors"] = big
    assert client.head_object(Bucket=s3_bucket, Key="data/big.safetensors")["ETag"].endswith('-3"')
    uri, cache = S3Uri.parse(f"s3://{s3_bucket}/data"), tmp_path / "cache"

    fetched = []

    class Killed(BaseException):
        """The pod dies half-way (raised from inside the download loop, like a SIGKILL would stop it)."""

    def die_after_eight(obj):
        fetched.append(obj.key)
        if len(fetched) == 8:
            raise Killed

    with pytest.raises(Killed):
        Downloader(s3_server.client(), cache, Retry(seconds=30), concurrency=4).download(uri, on_file=die_after_eight)
    (cache / "tmp" / "half-written").write_bytes(b"partial")  # what a killed transfer leaves behind

    downloader = Downloader(s3_server.client(), cache, Retry(seconds=30), concurrency=8)
    folder, stats = downloader.download(uri)
    assert stats.skipped == len(fetched) and stats.files == len(blobs) - len(fetched)
    assert {f"data/{p}" for p in files_under(folder)} == set(blobs)
    for key, body in blobs.items():
        assert (folder / key.split("/", 1)[1]).read_bytes() == body
    assert list((cache / "tmp").iterdir()) == []

    _, stats = downloader.download(uri)
    assert (stats.files, stats.skipped) == (0, len(blobs))  # unchanged: nothing fetched
    client.put_object(Bucket=s3_bucket, Key="data/part-00.bin", Body=b"changed")
    client.delete_object(Bucket=s3_bucket, Key="data/part-01.bin")
    (folder / "part-02.bin").write_bytes(b"tampered locally")
    _, stats = downloader.download(uri)
    assert (stats.files, stats.removed) == (2, 1)
    assert (folder / "part-00.bin").read_bytes() == b"changed" and not (folder / "part-01.bin").exists()
    assert (folder / "part-02.bin").read_bytes() == blobs["data/part-02.bin"]


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root to mount a small tmpfs in a private mount namespace")
def test_a_dataset_larger_than_the_disk_fails_before_downloading(tmp_path, s3_server, s3_bucket, s3_env, dataset):
    s3_server.client().put_object(Bucket=s3_bucket, Key="datasets/shapes/huge.bin", Body=os.urandom(2 << 20))
    cache = tmp_path / "cache"
    cache.mkdir()
    config = sd_config(tmp_path, s3_bucket, s3_cache_dir=str(cache))
    script = f"mount -t tmpfs -o size=1m tmpfs {cache} && {sys.executable} -m lora_trainer.cli --config {{}}"
    cfg_path = write_config(tmp_path, config)
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script.format(cfg_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **s3_env},
    )
    assert proc.returncode == ExitCode.OUTPUT_FAILED == 7, proc.stderr[-2000:]
    message = termination_message(config)
    assert message["reason"] == "OutputFailed" and message["permanent"] is False
    assert re.search(
        r"s3://\S+/datasets/shapes: 10 object\(s\) of 2\.1 MB do not fit in the 1\.0 MB free", message["error"]
    )
    assert list_keys(s3_server.client(), s3_bucket, "runs/shapes") == set()  # no output started


def test_a_disk_that_fills_during_a_download_is_an_output_error_naming_the_object(
    tmp_path, s3_server, s3_bucket, dataset, monkeypatch
):
    real_pwrite = os.pwrite

    def disk_fills(fd, data, offset):
        if offset + len(data) > 300:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", disk_fills)
    downloader = Downloader(s3_server.client(), tmp_path / "cache", Retry(seconds=30), concurrency=2)
    with pytest.raises(OutputError, match=r"disk full while downloading s3://\S+/datasets/shapes/\S+\.(png|csv)"):
        downloader.download(S3Uri.parse(dataset))
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    client, root = s3_server.client(), tmp_path / "cache" / "s3"
    written = [p for p in root.rglob("*") if p.is_file()]
    for path in written:  # only whole, verified objects reached the dataset folder
        assert (
            path.read_bytes()
            == client.get_object(Bucket=s3_bucket, Key=path.relative_to(root / s3_bucket).as_posix())["Body"].read()
        )
    folder, stats = downloader.download(S3Uri.parse(dataset))  # space again: the download completes
    assert (stats.files, stats.skipped) == (9 - len(written), len(written)) and len(written) < 9
    assert (folder / "metadata.csv").is_file()


def test_large_files_upload_multipart_and_come_back_intact(tmp_path, s3_server, s3_bucket):
    body = os.urandom(11 * 1024 * 1024)
    (tmp_path / "w.safetensors").write_bytes(body)
    store = Store(
        s3_server.client(), Retry(seconds=10), concurrency=4, multipart_threshold=5 * 2**20, part_size=5 * 2**20
    )
    target = S3Uri.parse(f"s3://{s3_bucket}/out/w.safetensors")
    store.put_files([(tmp_path / "w.safetensors", target)])
    store.close()
    head = s3_server.client().head_object(Bucket=s3_bucket, Key=target.key)
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    path, _ = Downloader(s3_server.client(), tmp_path / "cache", Retry(seconds=10)).download(target)
    assert path.read_bytes() == body
