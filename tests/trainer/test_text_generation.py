"""Causal-LM LoRA with the tiny Llama preset: outputs, keys, peft loading, learning."""

from __future__ import annotations

import torch
from safetensors import safe_open

from lora_trainer.presets import preset_path

from .conftest import LLM_BASE, run
from .test_text_to_image import files_under


def test_output_folder_and_peft_keys(tmp_path):
    run(LLM_BASE, tmp_path, max_train_steps=2, save_steps=0)
    assert files_under(tmp_path) == {
        "pytorch_lora_weights.safetensors",
        "adapter_model.safetensors",
        "adapter_config.json",
        "config_backup.yaml",
        ".lora-owner.json",
        "checkpoints/pytorch_lora_weights_final.safetensors",
        "EXPERIMENT.md",
        "loss_curve.png",
    }
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert {k.split(".")[-3] for k in keys} == {"q_proj", "v_proj"}
    assert (meta["rank"], meta["task_type"], meta["base_model"]) == ("4", "text-generation", "preset:tiny-llm")


def test_peft_loads_the_adapter_and_reproduces_the_trained_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = run(LLM_BASE, tmp_path, network_alpha=8, learning_rate=1e-2, max_train_steps=3, save_steps=0)
    base = AutoModelForCausalLM.from_pretrained(preset_path("preset:tiny-llm"))
    ids = torch.tensor([[60, 61, 62, 63, 64]])
    with torch.no_grad():
        plain = base(ids).logits
        loaded = PeftModel.from_pretrained(base, tmp_path).eval()
        trained = recipe.task.model.eval()
        assert loaded.peft_config["default"].lora_alpha == 8
        assert torch.allclose(loaded(ids).logits, trained(ids).logits, atol=1e-5)
        assert not torch.allclose(loaded(ids).logits, plain, atol=1e-4)


def test_loss_falls_when_overfitting(tmp_path):
    # a random tiny LM's frozen lm_head (std 0.02) hides upstream changes, so it gets LoRA too
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    recipe = run(
        LLM_BASE,
        tmp_path,
        train_data_dir=LLM_BASE["train_data_dir"] + "/chat.jsonl",
        max_train_steps=40,
        learning_rate=1e-2,
        lora_rank=8,
        save_steps=0,
        target_modules=targets,
    )
    losses = [loss for _, loss in recipe.summary.losses]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)  # measured: 5.32 -> 1.37


def test_chat_only_dataset_trains(tmp_path):
    recipe = run(
        LLM_BASE,
        tmp_path,
        train_data_dir=LLM_BASE["train_data_dir"] + "/chat.jsonl",
        dataset_format="chat",
        max_train_steps=2,
        save_steps=0,
    )
    assert recipe.summary.data_summary["format"] == "chat: 4"
