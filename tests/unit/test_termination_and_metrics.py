"""The termination message (shape, shortening to 4096 bytes, no secrets), the Prometheus rendering,
and the cluster defaults; no server needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lora_trainer.config import build_config
from lora_trainer.errors import ExitCode, Interrupted, StorageError
from lora_trainer.launch import StopSignal, with_cluster_defaults
from lora_trainer.metrics import TrainerMetrics
from lora_trainer.observers import RunInfo, StepStats
from lora_trainer.summary import Artifact, RunSummary
from lora_trainer.termination import LIMIT, LocalOutputs, TerminationReport, build_message, encode

BASE = {"base_model": "preset:tiny-sd", "train_data_dir": "./data"}


def summary(**kw) -> RunSummary:
    s = RunSummary(step=100, total_steps=100, loss=0.09312345, checkpoints=[50], resumed_from=None)
    s.artifacts = [Artifact("/out/pytorch_lora_weights.safetensors", "diffusers", "9f" * 32, 100)]
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_success_message_has_the_documented_shape():
    message = build_message(
        ExitCode.OK,
        summary(),
        uri_for=lambda p: "s3://loras/cats/" + p.rsplit("/", 1)[-1],
        last_checkpoint=(50, "s3://loras/cats/checkpoints/state_step_50"),
    )
    assert message == {
        "status": "succeeded",
        "exitCode": 0,
        "step": 100,
        "totalSteps": 100,
        "loss": 0.093123,
        "artifacts": [
            {
                "uri": "s3://loras/cats/pytorch_lora_weights.safetensors",
                "format": "diffusers",
                "sha256": "9f" * 32,
                "step": 100,
            }
        ],
        "lastCheckpoint": {"step": 50, "uri": "s3://loras/cats/checkpoints/state_step_50"},
    }


def test_failure_and_interruption_messages():
    failed = build_message(ExitCode.STORAGE_INVALID, None, "s3://b: the bucket does not exist", "StorageInvalid", True)
    assert failed == {
        "status": "failed",
        "exitCode": 6,
        "error": "s3://b: the bucket does not exist",
        "reason": "StorageInvalid",
        "permanent": True,
    }
    stopped = build_message(
        ExitCode.INTERRUPTED,
        summary(step=37),
        None,
        "Interrupted",
        False,
        last_checkpoint=(37, "s3://b/r/checkpoints/state_step_37"),
    )
    assert stopped["status"] == "interrupted" and stopped["permanent"] is False and "artifacts" not in stopped
    assert stopped["lastCheckpoint"]["step"] == 37 and "error" not in stopped


def test_long_messages_are_shortened_to_4096_bytes_and_stay_valid_json():
    many = summary()
    many.artifacts = [Artifact(f"/out/{i:03d}-" + "x" * 100, "kohya", "ab" * 32, 100) for i in range(60)]
    text = encode(build_message(ExitCode.OK, many))
    decoded = json.loads(text)
    assert len(text.encode()) <= LIMIT and "\n" not in text
    assert decoded["artifacts"][0]["uri"].startswith("/out/000-")  # the first (main) artifact is kept
    assert decoded["artifactsOmitted"] == 60 - len(decoded["artifacts"])

    error = "é" * 10_000  # multi-byte: cut on bytes, never mid-character
    text = encode(build_message(ExitCode.CRASH, summary(), error, "Crashed"))
    decoded = json.loads(text)
    assert len(text.encode()) <= LIMIT and decoded["error"].endswith(" [...]") and decoded["reason"] == "Crashed"
    assert len(text.encode()) > LIMIT - 64  # as much of the error as fits


def test_report_writes_on_failure_without_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key")
    report = TerminationReport(path=str(tmp_path / "term"))
    assert report.failed(StorageError("bad: very-secret-key")) == ExitCode.STORAGE_INVALID
    report.write()
    line = (tmp_path / "term").read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {
        "status": "failed",
        "exitCode": 6,
        "error": "bad: ***",
        "reason": "StorageInvalid",
        "permanent": True,
    }


def test_report_names_the_local_checkpoint_after_an_interruption(tmp_path):
    report = TerminationReport(
        path=str(tmp_path / "term"),
        summary=summary(step=7, checkpoints=[4, 7]),
        outputs=LocalOutputs(str(tmp_path / "out")),
    )
    report.failed(Interrupted("stopped by SIGTERM at step 7"))
    report.write()
    message = json.loads((tmp_path / "term").read_text())
    assert message["lastCheckpoint"] == {"step": 7, "uri": str(tmp_path / "out/checkpoints/state_step_7")}
    assert message["reason"] == "Interrupted" and "error" not in message


def test_the_default_path_is_written_only_where_it_exists(monkeypatch):
    monkeypatch.delenv("LORA_TERMINATION_MESSAGE_PATH", raising=False)
    report = TerminationReport(env={})
    assert report.target() is None or report.target().exists()  # never creates /dev/termination-log
    assert str(TerminationReport(env={"LORA_TERMINATION_MESSAGE_PATH": "/x/t"}).target()) == "/x/t"


# -- metrics
def parse(metrics: TrainerMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_use_the_design_names_and_labels():
    ticks = iter([0.0, 5.0, 10.0, 10.5])
    metrics = TrainerMetrics("cats", "team-a", clock=lambda: next(ticks))
    metrics.on_start(RunInfo(total_steps=100, start_step=40, epochs=2, device="cpu", trainable_parameters=1))
    metrics.on_step(
        StepStats(
            step=41,
            total_steps=100,
            epoch=1,
            epochs=2,
            loss=0.25,
            learning_rate=1e-4,
            grad_norm=1.0,
            samples=4,
            tokens=512,
            step_seconds=0.3,
            eta_seconds=17.4,
        )
    )
    metrics.on_checkpoint(
        41, [Path("out/checkpoints/pytorch_lora_weights_step_41.safetensors"), Path("out/checkpoints/state_step_41")]
    )
    values = parse(metrics)
    labels = (("job_name", "cats"), ("namespace", "team-a"))
    assert values[("lora_train_step", labels)] == 41
    assert values[("lora_train_total_steps", labels)] == 100
    assert values[("lora_train_loss", labels)] == 0.25
    assert values[("lora_train_learning_rate", labels)] == 1e-4
    assert values[("lora_train_samples_total", labels)] == 4
    assert values[("lora_train_tokens_total", labels)] == 512
    assert values[("lora_train_step_seconds_count", labels)] == 1
    assert values[("lora_train_step_seconds_bucket", (*labels[:1], ("le", "0.5"), labels[1]))] == 1
    assert values[("lora_train_checkpoint_seconds", labels)] == 0.5  # 10.0 (step end) -> 10.5 (checkpoint)
    assert values[("lora_train_gpu_memory_bytes", labels)] == 0  # no CUDA here
    assert values[("lora_train_epoch", labels)] == 1 and values[("lora_train_eta_seconds", labels)] == 17.4
    assert values[("lora_train_last_checkpoint_step", (*labels, ("uri", "out/checkpoints/state_step_41")))] == 41


def test_auto_label_progress_is_a_pair_of_gauges():
    metrics = TrainerMetrics("cats", "team-a")
    labels = (("job_name", "cats"), ("namespace", "team-a"))
    assert parse(metrics)[("lora_train_labeling_images", labels)] == 0  # nothing to caption (yet)
    metrics.on_labeling(0, 40)
    metrics.on_labeling(16, 40)
    values = parse(metrics)
    assert values[("lora_train_labeling_images", labels)] == 40
    assert values[("lora_train_labeled_images", labels)] == 16


def test_with_an_s3_mirror_the_last_checkpoint_is_the_newest_uploaded_one():
    metrics = TrainerMetrics("cats", "team-a")
    metrics.checkpoints_are_local = False
    metrics.on_checkpoint(4, [Path("out/checkpoints/state_step_4")])  # written, not yet on S3
    assert not [k for k in parse(metrics) if k[0] == "lora_train_last_checkpoint_step"]
    metrics.checkpoint_saved(2, "s3://b/run/checkpoints/state_step_2")
    metrics.checkpoint_saved(4, "s3://b/run/checkpoints/state_step_4")
    series = {k: v for k, v in parse(metrics).items() if k[0] == "lora_train_last_checkpoint_step"}
    assert list(series.values()) == [4] and dict(next(iter(series))[1])["uri"] == "s3://b/run/checkpoints/state_step_4"


def test_a_metrics_port_in_use_is_a_warning_not_a_failure(caplog):
    first, second = TrainerMetrics("a", "n"), TrainerMetrics("b", "n")
    address = first.serve(0, "127.0.0.1")
    assert address is not None
    assert second.serve(int(address.rsplit(":", 1)[1]), "127.0.0.1") is None
    assert "cannot serve" in caplog.text
    first.close(), second.close()


# -- cluster defaults
@pytest.mark.parametrize(
    "overrides, env, resume",
    [
        ({}, {}, None),
        ({"output_dir": "s3://loras/cats"}, {}, "latest"),
        ({}, {"LORA_JOB_NAME": "cats"}, "latest"),
        (
            {"output_dir": "s3://loras/cats", "resume": "s3://loras/cats/checkpoints/state_step_4"},
            {},
            "s3://loras/cats/checkpoints/state_step_4",
        ),
    ],
)
def test_resume_defaults_to_latest_where_a_run_may_be_restarted(overrides, env, resume):
    assert with_cluster_defaults(build_config({**BASE, **overrides}), env).resume == resume


def test_stop_signal_remembers_when_sigterm_came():
    stop = StopSignal()
    assert stop.at is None and not stop.is_set()
    stop.set()
    first = stop.at
    stop.set()
    assert stop.at == first and stop.grace_deadline(25) == first + 25
