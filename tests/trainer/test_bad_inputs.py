"""Each documented bad input ends the run with its message and exit code, and no finished-looking output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_trainer.cli import main
from lora_trainer.errors import ExitCode
from tests.integration.trainer_world import can_mount_tmpfs

from .conftest import LLM_BASE, SAMPLE, SD_BASE


def copy_images(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(SAMPLE / "images", data)
    return data


def run_cli(tmp_path: Path, capsys, base: dict, **overrides) -> tuple[int, str]:
    cfg = {**base, "output_dir": str(tmp_path / "out"), "max_train_steps": 2, **overrides}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["--config", str(path)])
    return code, capsys.readouterr().err


def assert_not_finished(tmp_path: Path) -> None:
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    assert not list((tmp_path / "out").rglob(".*.tmp")) if (tmp_path / "out").exists() else True


def missing_image(d: Path) -> None:
    (d / "red_square.png").unlink()


def unreadable_image(d: Path) -> None:
    (d / "blue_circle.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")


def empty_dataset(d: Path) -> None:
    for p in d.iterdir():
        p.unlink()


def captions_missing(d: Path) -> None:
    (d / "metadata.csv").unlink()
    (d / "red_circle.txt").write_text("a red circle")


@pytest.mark.parametrize(
    "damage, code, message",
    [
        (missing_image, ExitCode.DATASET_INVALID, r"lists 1 image\(s\) that do not exist: red_square.png"),
        (unreadable_image, ExitCode.DATASET_INVALID, r"1 image\(s\) cannot be read: blue_circle.png"),
        (empty_dataset, ExitCode.DATASET_INVALID, "holds no images"),
        (captions_missing, ExitCode.DATASET_INVALID, r"7 of 8 image\(s\) have no caption in .txt files"),
    ],
    ids=["missing-image", "unreadable-image", "empty-dataset", "captions-missing"],
)
def test_bad_datasets(tmp_path, capsys, damage, code, message):
    data = copy_images(tmp_path)
    damage(data)
    exit_code, err = run_cli(tmp_path, capsys, SD_BASE, train_data_dir=str(data))
    assert exit_code == code == 3
    assert re.search(message, err), err
    assert "DatasetInvalid" in err
    assert_not_finished(tmp_path)


def test_a_bad_dataset_fails_before_any_model_loads(tmp_path, capsys):
    data = copy_images(tmp_path)
    empty_dataset(data)
    exit_code, err = run_cli(tmp_path, capsys, SD_BASE, train_data_dir=str(data), base_model="/nonexistent/model")
    assert exit_code == ExitCode.DATASET_INVALID  # the dataset is checked first: no model error


@pytest.mark.parametrize(
    "base_model, message",
    [
        ("./models/nope", "base_model ./models/nope does not exist"),
        ("preset:tiny-nope", "unknown preset 'preset:tiny-nope'; available: preset:tiny-sd"),
        ("some-org/some-model", "cannot load model_index.json from base_model some-org/some-model"),  # no hub
    ],
)
def test_unknown_base_model(tmp_path, capsys, base_model, message):
    exit_code, err = run_cli(tmp_path, capsys, SD_BASE, base_model=base_model)
    assert exit_code == ExitCode.MODEL_INVALID == 4
    assert message in err
    assert_not_finished(tmp_path)


def test_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    exit_code, err = run_cli(tmp_path, capsys, LLM_BASE, base_model=str(tmp_path / "model"))
    assert exit_code == ExitCode.MODEL_INVALID
    assert f"cannot load the tokenizer from base_model {tmp_path / 'model'}" in err


def test_diverging_loss_stops_the_run_naming_the_step(tmp_path, capsys):
    exit_code, err = run_cli(
        tmp_path, capsys, SD_BASE, learning_rate=1e12, max_grad_norm=0, max_train_steps=20, save_steps=0
    )
    assert exit_code == ExitCode.TRAINING_DIVERGED == 5
    assert re.search(r"loss became (nan|inf|-inf) at step \d+ \(epoch \d+\)", err), err
    assert_not_finished(tmp_path)


def test_invalid_config_exit_code(tmp_path, capsys):
    exit_code, err = run_cli(tmp_path, capsys, SD_BASE, lora_rank=0, learning_rat=1)
    assert exit_code == ExitCode.CONFIG_INVALID == 2
    assert "'lora_rank': must be >= 1" in err and "did you mean 'learning_rate'" in err


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root to mount a small tmpfs in a private mount namespace")
def test_disk_full_is_a_clear_error_and_leaves_no_finished_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = {**SD_BASE, "output_dir": str(out), "max_train_steps": 4, "save_steps": 2}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # 100 KiB: the config backup and step weights fit, the optimizer state does not
    script = (
        f"mount -t tmpfs -o size=100k tmpfs {out} && {sys.executable} -m lora_trainer.cli "
        f"--config {tmp_path / 'cfg.yaml'}; code=$?; echo TOP $(ls -A {out}); "
        f"echo CHECKPOINTS $(ls -A {out}/checkpoints); exit $code"
    )
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == ExitCode.OUTPUT_FAILED == 7, proc.stderr[-2000:]
    assert "disk full while writing" in proc.stderr and "OutputFailed" in proc.stderr
    listing = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("TOP", "CHECKPOINTS")))
    assert listing["TOP"].split() == [".lora-owner.json", "checkpoints", "config_backup.yaml", "logs"]
    # the step weights fit; the incomplete state folder has no manifest; no half-written file is left
    assert listing["CHECKPOINTS"].split() == ["pytorch_lora_weights_step_2.safetensors", "state_step_2"]
    assert ".tmp" not in proc.stdout


@pytest.mark.parametrize("workers, whole_group", [(0, False), (2, True)], ids=["process", "group-with-workers"])
def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path, workers, whole_group):
    """A real process and a real signal: the run stops at a step boundary with a complete checkpoint, also
    when the signal goes to the whole process group and so reaches the data loader workers too."""
    import signal
    import time

    out = tmp_path / "out"
    cfg = {**SD_BASE, "output_dir": str(out), "max_train_steps": 100000, "save_steps": 0, "num_workers": workers}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_trainer.cli", "--config", str(tmp_path / "cfg.yaml")],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "logs").glob("events.*")) if out.exists() else True:
        time.sleep(0.5)
        if time.time() > deadline:
            break
    time.sleep(2)  # a few steps in
    if whole_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED == 143, err[-2000:]
    states = sorted((out / "checkpoints").glob("state_step_*/manifest.json"))
    assert len(states) == 1 and "stopped by SIGTERM at step" in err
    assert not (out / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root to mount in a private mount namespace")
def test_read_only_output_is_an_output_error_not_a_crash(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    cfg = {**SD_BASE, "output_dir": str(out), "max_train_steps": 2, "save_steps": 0}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    script = (
        f"mount --bind {out} {out} && mount -o remount,bind,ro {out} && "
        f"{sys.executable} -m lora_trainer.cli --config {tmp_path / 'cfg.yaml'}"
    )
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (ExitCode.OUTPUT_FAILED, ExitCode.CONFIG_INVALID), proc.stderr[-2000:]
    assert "read-only" in proc.stderr or "is not writable" in proc.stderr
