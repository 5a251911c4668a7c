"""Secrets never written: environment secrets, URL passwords and secret URL parameters leave every message,
config_backup.yaml, EXPERIMENT.md and weight-file metadata (the run-level check: tests/integration)."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors import safe_open

from lora_trainer.checkpoint import save_safetensors
from lora_trainer.config import build_config, config_to_yaml
from lora_trainer.redaction import redact, secret_values

ENV = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-secret",
    "HF_TOKEN": "hf_abcdefghijklmnop",
    "WANDB_API_KEY": "0123456789abcdef",
    "db_password": "hunter2-long",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",  # an identifier, not a secret
    "PATH": "/usr/bin",
    "SHORT_TOKEN": "abc",  # too short to replace without blanking out ordinary words
}


def test_which_environment_values_are_secret():
    assert set(secret_values(ENV)) == {
        "wJalrXUtnFEMI-secret",
        "hf_abcdefghijklmnop",
        "0123456789abcdef",
        "hunter2-long",
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        ("failed with wJalrXUtnFEMI-secret", "failed with ***"),
        ("hf_abcdefghijklmnop and 0123456789abcdef", "*** and ***"),
        ("http://user:pa55w0rd@127.0.0.1:9000/x", "http://***@127.0.0.1:9000/x"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F2026&X-Amz-Signature=ab12&x=1",
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***&x=1",
        ),
        ("https://h/api?token=t0k3n#frag", "https://h/api?token=***#frag"),
        ("https://h/api?a=1&api_key=zz&password=pw", "https://h/api?a=1&api_key=***&password=***"),
        ("AKIAEXAMPLE in /usr/bin, key=value, abc", "AKIAEXAMPLE in /usr/bin, key=value, abc"),
    ],
)
def test_redact(text, expected):
    assert redact(text, ENV) == expected


def test_config_backup_holds_no_secret_and_stays_valid_yaml(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    cfg = build_config(
        {
            "base_model": "preset:tiny-sd",
            "train_data_dir": "data",
            "s3_endpoint_url": "http://admin:pa55w0rd@127.0.0.1:8333",
            "description": "hf_abcdefghijklmnop",  # a whole value that is a secret: '***' must be quoted
            "validation_prompts": ["a cat", "hf_abcdefghijklmnop"],
        }
    )
    text = config_to_yaml(cfg)
    assert "pa55w0rd" not in text and "hf_abcdefghijklmnop" not in text
    loaded = yaml.safe_load(text)
    assert loaded["s3_endpoint_url"] == "http://***@127.0.0.1:8333"
    assert loaded["description"] == "***" and loaded["validation_prompts"] == ["a cat", "***"]


def test_weight_file_metadata_holds_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    save_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(2)}, {"ss_training_comment": "hf_abcdefghijklmnop"})
    assert b"hf_abcdefghijklmnop" not in (tmp_path / "w.safetensors").read_bytes()
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert f.metadata() == {"ss_training_comment": "***"}
