"""The trainer config: aliases, validation messages, resolved defaults, manifests."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lora_trainer.config import (
    TrainConfig,
    build_config,
    config_fields,
    config_from_spec,
    config_to_yaml,
    load_config,
    parse_overrides,
    read_yaml,
)
from lora_trainer.config.manifest import SPEC_TO_CONFIG
from lora_trainer.errors import ConfigError, ExitCode

BASE = {"base_model": "preset:tiny-sd", "train_data_dir": "data"}


def problems_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    return str(info.value)


def test_lora_scripts_config_with_aliases_maps_onto_canonical_keys():
    cfg = build_config(
        {
            "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
            "data_dir": "./train/images",
            "network_dim": 32,
            "lora_alpha": 16,
            "train_batch_size": 2,
            "num_train_epochs": 10,
            "learning_rate": "1e-4",  # PyYAML reads this as a string
            "lr_scheduler_type": "cosine",
            "save_total_limit": 3,
            "dataloader_num_workers": 2,
        }
    )
    assert (cfg.base_model, cfg.train_data_dir) == ("runwayml/stable-diffusion-v1-5", "./train/images")
    assert (cfg.lora_rank, cfg.network_alpha, cfg.batch_size, cfg.epochs) == (32, 16.0, 2, 10)
    assert cfg.learning_rate == pytest.approx(1e-4)
    assert (cfg.lr_scheduler, cfg.keep_checkpoints, cfg.num_workers) == ("cosine", 3, 2)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"learning_rat": 1e-4}, "unknown key 'learning_rat'; did you mean 'learning_rate'?"),
        ({"netwrk_dim": 8}, "did you mean 'network_dim (= lora_rank)'?"),
        ({"lora_rank": "eight"}, "'lora_rank': expected a whole number, got 'eight'"),
        ({"lora_rank": 0}, "'lora_rank': must be >= 1, got 0"),
        ({"lora_rank": 2.5}, "'lora_rank': expected a whole number, got 2.5"),
        ({"network_alpha": 0}, "'network_alpha': must be > 0, got 0.0"),
        ({"learning_rate": "fast"}, "'learning_rate': expected a number, got 'fast'"),
        ({"lr_scheduler": "cosinus"}, "'lr_scheduler': 'cosinus' is not one of constant, constant_with_warmup"),
        ({"mixed_precision": "fp8"}, "'mixed_precision': 'fp8' is not one of no, fp16, bf16"),
        ({"task_type": "image-to-video"}, "'task_type': 'image-to-video' is not one of text-to-image"),
        ({"center_crop": "yes"}, "'center_crop': expected true or false, got 'yes'"),
        ({"lora_dropout": 1.5}, "'lora_dropout': must be <= 1, got 1.5"),
        ({"target_modules": []}, "'target_modules': must not be empty"),
        ({"target_modules": [1, 2]}, "'target_modules': expected a list of strings"),
        ({"caption_extension": "txt"}, "'caption_extension' must start with a dot"),
        ({"output_dir": "s3://x/out"}, "'output_dir': 's3://x/out' is not a valid s3://bucket/prefix URI"),
        ({"lora_rank": 4, "rank": 8}, "'rank' sets 'lora_rank' a second time"),
        ({"max_train_steps": 10, "lr_warmup_steps": 20}, "'lr_warmup_steps' (20) exceeds 'max_train_steps' (10)"),
        ({"save_formats": ["onnx"]}, "'save_formats': 'onnx' is not one of diffusers, kohya"),
        (
            {"task_type": "text-generation", "auto_label": True},
            "'auto_label' applies to text-to-image only (task_type is text-generation)",
        ),
        ({"task_type": "text-generation", "model_family": "flux1"}, "'model_family' applies to text-to-image only"),
        ({"dataset_format": "chat"}, "'dataset_format' applies to text-generation only (task_type is text-to-image)"),
        ({"model_family": "flux3"}, "'model_family': 'flux3' is not one of auto, sd, sdxl, flux1, flux2, sd3"),
        ({"weighting_scheme": "cosine"}, "'weighting_scheme': 'cosine' is not one of none, logit_normal, mode"),
        (
            {"enable_bucket": True, "resolution": 32, "min_bucket_reso": 8, "bucket_reso_steps": 64},
            "'bucket_reso_steps' (64) must be at most 'resolution' (32)",
        ),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(raw, message):
    assert message in problems_of({**BASE, **raw})


@pytest.mark.parametrize(
    "output_dir, logging_dir, refused",
    [
        ("s3://bucket/run/out", "s3://bucket/run", True),  # the S3 parent: its working copy would hold output's
        ("s3://bucket/run/out", "s3://bucket/run/out/", True),
        ("s3://bucket/run/out", "s3://bucket", True),  # the whole bucket
        ("out/run", "out", True),
        ("out/run", "./out/run", True),
        ("s3://bucket/run/out", "s3://bucket/run/out/logs", False),
        ("s3://bucket/run/out", "s3://bucket/run/outlogs", False),
        ("s3://bucket/run/out", "s3://bucket/logs/out", False),
        ("out/run", "s3://bucket/out", False),
        ("out/run", "out/run/tb", False),
    ],
)
def test_logging_dir_may_not_hold_output_dir(output_dir, logging_dir, refused):
    raw = {**BASE, "output_dir": output_dir, "logging_dir": logging_dir}
    if refused:
        assert "must not be output_dir or a folder above it" in problems_of(raw)
    else:
        assert build_config(raw).logging_dir == logging_dir


def test_required_keys_and_every_problem_reported_at_once():
    text = problems_of({"lora_rank": -1, "learning_rat": 1})
    assert "'base_model' is required" in text
    assert "'train_data_dir' is required" in text
    assert "'lora_rank': must be >= 1" in text
    assert "unknown key 'learning_rat'" in text


def test_config_error_is_a_permanent_invalid_input_exit_code():
    with pytest.raises(ConfigError) as info:
        build_config({})
    assert info.value.exit_code == ExitCode.CONFIG_INVALID == 2
    assert info.value.permanent


def test_defaults_that_depend_on_other_keys_are_resolved():
    cfg = build_config({**BASE, "lora_rank": 4, "output_dir": "runs/cat/"})
    assert cfg.network_alpha == 4.0
    assert cfg.logging_dir == "runs/cat/logs"
    assert cfg.output_name == "cat"
    assert cfg.text_encoder_lr == cfg.learning_rate
    # what the model decides stays unset here: the task and the model family fill it (tests/trainer)
    assert cfg.target_modules is None and cfg.cache_text_encoder_outputs is None and cfg.gradient_checkpointing is None


def test_comma_separated_target_modules_as_lora_scripts_writes_them():
    assert build_config({**BASE, "target_modules": "to_q, to_v"}).target_modules == ["to_q", "to_v"]


def test_config_backup_loads_back_into_the_same_config(tmp_path):
    cfg = build_config({**BASE, "lora_rank": 8, "learning_rate": 3e-4, "description": "a run"})
    path = tmp_path / "config_backup.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


def test_overrides_are_parsed_as_yaml_and_win(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, "lora_rank": 4}))
    cfg = load_config(path, ["lora_rank=16", "center_crop=true", "target_modules=[to_q, to_k]", "lr=2e-4"])
    assert (cfg.lora_rank, cfg.center_crop, cfg.target_modules) == (16, True, ["to_q", "to_k"])
    assert cfg.learning_rate == pytest.approx(2e-4)
    assert parse_overrides(["description=a b c"]) == {"description": "a b c"}
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(path, ["lora_rank"])
    with pytest.raises(ConfigError, match="--set unknown key 'lora_rnak'; did you mean 'lora_rank'"):
        load_config(path, ["lora_rnak=3"])


def test_unquoted_no_in_yaml_means_the_choice_no(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("base_model: preset:tiny-sd\ntrain_data_dir: data\nmixed_precision: no\n")
    assert load_config(path).mixed_precision == "no"
    assert load_config(path, ["mixed_precision=no"]).mixed_precision == "no"
    assert "'mixed_precision': expected text, got True" in problems_of({**BASE, "mixed_precision": True})
    assert "'device': expected text, got False" in problems_of({**BASE, "device": False})  # no "no" choice


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("- a\n- b\n", "must be a mapping of keys to values, got list"),
        ("base_model: [unclosed\n", "is not valid YAML"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(  # billion laughs: 10**10 strings
                f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefghi", "bcdefghij")
            ),
            "aliases expand past 100000 YAML nodes",
        ),
        ("a: &a [1, *a]\n", "or refer to themselves"),
        ("a: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested too deeply"),
    ],
)
def test_unreadable_config_files(tmp_path, text, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_yaml_aliases_of_ordinary_size_still_work(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("common: &t [q_proj, v_proj]\ntarget_modules: *t\n")
    assert read_yaml(path)["target_modules"] == ["q_proj", "v_proj"]


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


MANIFEST = {
    "apiVersion": "lora-operator.io/v1alpha1",
    "kind": "LoRATrainingJob",
    "metadata": {"name": "cats"},
    "spec": {
        "task": "text-to-image",
        "baseModel": "preset:tiny-sd",
        "dataset": {"uri": "s3://datasets/cats", "resolution": 64},
        "training": {
            "rank": 8,
            "alpha": 4,
            "batchSize": 2,
            "steps": 100,
            "learningRate": 1e-4,
            "precision": "bf16",
            "targetModules": ["to_q", "to_v"],
        },
        "output": {"uri": "s3://loras/cats", "saveSteps": 25, "keepCheckpoints": 2},
        "resources": {"gpus": 1},
        "backoffLimit": 3,
    },
}


def test_a_manifest_runs_as_the_same_config(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(MANIFEST))
    cfg = load_config(path)
    assert (cfg.train_data_dir, cfg.output_dir) == ("s3://datasets/cats", "s3://loras/cats")
    assert (cfg.lora_rank, cfg.network_alpha, cfg.batch_size, cfg.max_train_steps) == (8, 4.0, 2, 100)
    assert (cfg.mixed_precision, cfg.save_steps, cfg.keep_checkpoints, cfg.resolution) == ("bf16", 25, 2, 64)
    assert cfg.target_modules == ["to_q", "to_v"]


def test_manifest_with_unknown_spec_field_is_refused(tmp_path):
    doc = {**MANIFEST, "spec": {**MANIFEST["spec"], "training": {"rnk": 8}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"unknown spec field\(s\) spec.training.rnk"):
        load_config(path)
    doc["spec"]["training"] = {"learningRat": 1e-4}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"spec.training.learningRat \(did you mean spec.training.learningRate\?\)"):
        load_config(path)


def test_every_spec_mapping_targets_a_real_config_key():
    keys = {f.name for f in config_fields()}
    assert {key for _, key in SPEC_TO_CONFIG} <= keys
    assert config_from_spec({"training": {"rank": 3}, "unused": 1}) == {"lora_rank": 3}


def test_every_key_is_documented():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["doc"], f"config key {f.name} has no doc"


def test_docs_config_reference_is_up_to_date():
    from pathlib import Path

    from lora_trainer.config.reference import render

    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.read_text() == render(), "regenerate: python -m lora_trainer.config.reference > docs/config.md"


def test_benchmark_presets_have_the_real_sizes():
    """Built on the meta device: shapes only, no memory, so this runs anywhere."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_trainer.presets.llm import llama_1b_config
    from lora_trainer.presets.sd import sd15_unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
        llama = LlamaForCausalLM(LlamaConfig(**llama_1b_config(32000)))
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 860  # SD 1.5's UNet
    assert round(sum(p.numel() for p in llama.parameters()) / 1e8) == 11  # 1.1B
