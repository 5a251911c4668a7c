"""distributed_strategy fsdp: the frozen base's blocks sharded over the processes (FSDP2, gloo on CPU).
It trains the weights ddp and one process train, writes the same files, and its checkpoints resume under
ddp (and ddp's under fsdp); an nf4 base is sharded quantized, int8 and fp8 are refused naming both keys."""

from __future__ import annotations

import re

import pytest

from lora_trainer.config import build_config
from lora_trainer.errors import ConfigError, ExitCode
from lora_trainer.recipe import TrainingRecipe

from .conftest import LLM_BASE, SD_BASE, final_weights, make_config
from .test_distributed import lora_train
from .test_families import FAMILY_IDS
from .test_families import base as family_base

pytestmark = pytest.mark.slow

# measured on CPU with gloo: fsdp against ddp 0 to 2e-7 (the gathered block computes as the whole one), against
# one process with the global batch ~1e-8 to 1e-7 (the order of float additions)
ATOL = 1e-5


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


CASES = {
    "sd": dict(SD_BASE, batch_size=2, max_train_steps=4, save_steps=2),
    # with held-out validation: every process runs it (the main one reports)
    "llm": dict(LLM_BASE, batch_size=2, max_train_steps=4, save_steps=2, validation_split=0.1, validation_steps=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp_trains_the_weights_of_ddp_and_of_one_process(tmp_path, case):
    """2 x 2 under fsdp, under ddp, and 1 x 4 (fsdp, which one process runs as ddp); the fsdp checkpoint of
    step 2 resumed by one process ends with the same weights."""
    cfg = CASES[case]
    code, out = lora_train(tmp_path, {**cfg, "distributed_strategy": "fsdp"}, "--nproc-per-node", "2", name="fsdp")
    assert code == 0, out[-3000:]
    assert "blocks of the frozen base sharded over 2 processes" in out
    code, out = lora_train(tmp_path, cfg, "--nproc-per-node", "2", name="ddp")
    assert code == 0, out[-3000:]
    one = {**cfg, "batch_size": cfg["batch_size"] * 2, "distributed_strategy": "fsdp"}
    code, out = lora_train(tmp_path, one, name="one")
    assert code == 0, out[-3000:]
    assert "one process has nothing to shard; training as ddp" in out
    resumed = {**one, "distributed_strategy": "ddp", "resume": str(tmp_path / "fsdp/checkpoints/state_step_2")}
    code, out = lora_train(tmp_path, resumed, name="resumed")
    assert code == 0 and "resumed from" in out, out[-3000:]
    fsdp = final_weights(tmp_path / "fsdp")
    diffs = {n: worst(fsdp, final_weights(tmp_path / n)) for n in ("ddp", "one", "resumed")}
    print(case, "fsdp against", diffs)
    assert max(diffs.values()) <= ATOL, diffs
    # the same files, checkpoints included (output_name defaults to the folder's name)
    assert files(tmp_path / "fsdp") == files(tmp_path / "ddp")


def files(folder) -> set[str]:
    return {
        str(p.relative_to(folder)).replace(folder.name, "<name>")
        for p in folder.rglob("*")
        if "logs" not in p.parts  # TensorBoard's file names hold the time and pid
    }


def test_a_short_batch_and_checkpoints_that_move_between_fsdp_and_ddp(tmp_path):
    """8 images in global batches of 2 x 3: each epoch's second batch has 2 items, both rank 0's, so under fsdp
    rank 1 trains a stand-in at zero weight (the forwards are collectives). An fsdp checkpoint resumes under
    ddp and a ddp one under fsdp, each ending with the uninterrupted run's weights.

    Compared at 2 processes only: with this batch one process ends ~5e-5 away, fsdp or ddp alike (Adam
    magnifies float-order differences in the near-zero gradients of a LoRA down-projection)."""
    cfg = dict(SD_BASE, batch_size=3, max_train_steps=4, save_steps=2)
    fsdp = {**cfg, "distributed_strategy": "fsdp"}
    code, out = lora_train(tmp_path, fsdp, "--nproc-per-node", "2", name="fsdp")
    assert code == 0, out[-3000:]
    code, out = lora_train(tmp_path, cfg, "--nproc-per-node", "2", name="ddp")
    assert code == 0, out[-3000:]
    to_ddp = {**cfg, "resume": str(tmp_path / "fsdp/checkpoints/state_step_2")}
    code, out = lora_train(tmp_path, to_ddp, "--nproc-per-node", "2", name="fsdp-to-ddp")
    assert code == 0 and "resumed from" in out, out[-3000:]
    to_fsdp = {**fsdp, "resume": str(tmp_path / "ddp/checkpoints/state_step_2")}
    code, out = lora_train(tmp_path, to_fsdp, "--nproc-per-node", "2", name="ddp-to-fsdp")
    assert code == 0 and "resumed from" in out, out[-3000:]
    straight = final_weights(tmp_path / "fsdp")
    diffs = {n: worst(straight, final_weights(tmp_path / n)) for n in ("ddp", "fsdp-to-ddp", "ddp-to-fsdp")}
    print("fsdp against", diffs)
    assert max(diffs.values()) <= ATOL, diffs


@pytest.mark.parametrize("family", ["sd", "llm", *FAMILY_IDS])
def test_the_blocks_fsdp_shards_hold_the_bulk_of_the_base_and_every_lora_layer(tmp_path, family):
    """What each task and family hands fsdp (frozen_blocks): most of the frozen weights, and every LoRA
    layer of the denoiser or decoder (so the LoRA's forward always finds its block gathered)."""
    base = {"sd": SD_BASE, "llm": LLM_BASE}.get(family) or family_base(family)
    recipe = TrainingRecipe(make_config(base, tmp_path), observers=[])
    recipe.setup()
    blocks = recipe.task.frozen_blocks()
    inside = {id(p) for b in blocks for p in b.parameters()}
    model = getattr(recipe.task, "model", None) or recipe.task.family.parts.denoiser
    frozen = [p for p in model.parameters() if not p.requires_grad]
    share = sum(p.numel() for p in frozen if id(p) in inside) / sum(p.numel() for p in frozen)
    # real bases are >95% blocks; tiny presets keep full-size embedders (tiny Z-Image's timestep embedder is
    # 81% of it), so this only catches a family whose blocks were not found
    assert share > 0.15, share
    assert all(id(p) in inside for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model", ["llm", "sd", "flux1", "z-image"])
def test_under_fsdp_the_blocks_load_in_host_memory_and_the_rest_on_the_device(tmp_path, model):
    """A base bigger than one GPU must never be whole on one: with blocks_on_host the tasks leave the blocks
    where they loaded (fully_shard moves each block's slice to the device) and put the rest on the device.
    The meta device stands in for the GPU."""
    import torch

    from lora_trainer.families import detect_family
    from lora_trainer.tasks import build_task

    meta = torch.device("meta")
    cfg = make_config({"llm": LLM_BASE, "sd": SD_BASE}.get(model) or family_base(model), tmp_path)
    if model == "llm":
        task = build_task(cfg)
        task.prepare_data()
        task.load(meta, torch.float32, blocks_on_host=True)
        whole, blocks = task.model, task.frozen_blocks()
    else:  # the denoiser's loader (text encoders would embed captions on the device, which meta cannot)
        family = detect_family(cfg)(cfg)
        family.load_denoiser_and_vae(meta, torch.float32, blocks_on_host=True)
        whole, blocks = family.parts.denoiser, family.denoiser_blocks()
    inside = {id(p) for b in blocks for p in b.parameters()}
    assert {p.device for b in blocks for p in b.parameters()} == {torch.device("cpu")}
    assert {t.device for t in [*whole.parameters(), *whole.buffers()] if id(t) not in inside} == {meta}


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_fsdp_of_an_int8_or_fp8_base_is_refused_naming_both_keys(mode):
    with pytest.raises(ConfigError) as err:
        build_config(dict(LLM_BASE, output_dir="out", distributed_strategy="fsdp", base_quantization=mode))
    message = str(err.value)
    assert f"'distributed_strategy': fsdp cannot shard a base stored as base_quantization: {mode}" in message
    assert "use base_quantization: nf4" in message
    assert build_config(dict(LLM_BASE, output_dir="out", distributed_strategy="fsdp", base_quantization="nf4"))


def held_share(out: str) -> float:
    """The share of the sharded blocks' frozen bytes one process holds, from the trainer's fsdp log line."""
    held = re.search(r"their frozen weights take ([\d.]+) MiB in this process \(([\d.]+) MiB whole\)", out)
    assert held, out[-3000:]
    return float(held[1]) / float(held[2])


@pytest.fixture(scope="module")
def wide_llm(tmp_path_factory):
    """The tiny LLM's tokenizer with a 256-wide Llama: every projection is whole NF4 scale groups (16384
    values) that split in two."""
    import json
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_trainer.presets import preset_path

    source, folder = preset_path(LLM_BASE["base_model"]), tmp_path_factory.mktemp("wide-llm")
    shutil.copytree(source, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", ".complete"))
    config = {**json.loads((source / "config.json").read_text()), "hidden_size": 256, "intermediate_size": 512}
    config.pop("head_dim", None)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide_flux1(tmp_path_factory):
    """The tiny FLUX.1 pipeline with a 256-wide transformer: its blocks' Linears are whole NF4 scale groups."""
    import json
    import shutil

    import torch
    from diffusers import FluxTransformer2DModel

    from lora_trainer.presets import preset_path

    source, folder = preset_path(family_base("flux1")["base_model"]), tmp_path_factory.mktemp("wide-flux1")
    shutil.copytree(source, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("transformer", ".complete"))
    config = json.loads((source / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(attention_head_dim=64, num_attention_heads=4, axes_dims_rope=[16, 24, 24])
    torch.manual_seed(0)
    FluxTransformer2DModel(**config).save_pretrained(folder / "transformer")
    return folder


def test_fsdp_shards_an_nf4_diffusion_transformer_and_trains_the_weights_of_one_process(tmp_path, wide_flux1):
    """The diffusers side of the test below: FLUX.1's blocks in NF4, 2 x 2 against 1 x 4 (measured 1.9e-6
    with weights of magnitude ~1: the flow-matching loss of 4 images, summed in another order)."""
    cfg = family_base("flux1", base_model=str(wide_flux1), base_quantization="nf4", distributed_strategy="fsdp")
    code, out = lora_train(tmp_path, cfg, "--nproc-per-node", "2", name="fsdp")
    assert code == 0, out[-3000:]
    assert held_share(out) < 0.55, out[-3000:]
    code, out = lora_train(tmp_path, {**cfg, "batch_size": 4}, name="one")
    assert code == 0, out[-3000:]
    diff = worst(final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "one"))
    print("fsdp nf4 flux1 against one process", diff)
    assert diff <= ATOL


def test_fsdp_shards_an_nf4_base_quantized_and_trains_the_weights_of_one_process(tmp_path, wide_llm):
    """2 x 2 under fsdp with nf4 against 1 x 4 with the same config (torchao's NF4Tensor either way), and the
    fsdp checkpoint of step 2 resumed by one process. Each process holds half of the blocks' 4-bit weights."""
    cfg = dict(LLM_BASE, base_model=str(wide_llm), base_quantization="nf4", distributed_strategy="fsdp")
    cfg.update(batch_size=2, max_train_steps=4, save_steps=2)
    code, out = lora_train(tmp_path, cfg, "--nproc-per-node", "2", name="fsdp")
    assert code == 0, out[-3000:]
    assert held_share(out) < 0.55, out[-3000:]  # half, and the norms' halves
    assert "stay whole in every process" not in out
    one = {**cfg, "batch_size": 4}
    code, out = lora_train(tmp_path, one, name="one")
    assert code == 0, out[-3000:]
    resumed = {**one, "resume": str(tmp_path / "fsdp/checkpoints/state_step_2")}
    code, out = lora_train(tmp_path, resumed, name="resumed")
    assert code == 0 and "resumed from" in out, out[-3000:]
    fsdp = final_weights(tmp_path / "fsdp")
    diffs = {n: worst(fsdp, final_weights(tmp_path / n)) for n in ("one", "resumed")}
    print("fsdp nf4 against", diffs)
    assert max(diffs.values()) <= ATOL, diffs
    assert files(tmp_path / "fsdp") == files(tmp_path / "one")


def test_the_refusal_exits_2_before_any_process_starts(tmp_path):
    cfg = dict(LLM_BASE, distributed_strategy="fsdp", base_quantization="int8")
    code, out = lora_train(tmp_path, cfg, "--nproc-per-node", "2")
    assert code == ExitCode.CONFIG_INVALID, out[-3000:]
    assert "distributed_strategy" in out and "base_quantization: int8" in out
