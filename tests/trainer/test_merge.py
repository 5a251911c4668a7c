"""lora-merge: merged weights equal base + LoRAs at their scales (against diffusers' and peft's own
adapter code), single-file SD checkpoints load back with from_single_file and train, conversions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.errors import ExitCode
from lora_trainer.merge.cli import main
from lora_trainer.merge.models import parse_lora_spec
from lora_trainer.presets import preset_path

from .conftest import LLM_BASE, SD_BASE, run, tiny_sd_pipeline
from .test_kohya_format import WIDE_TARGETS


@pytest.fixture(scope="module")
def sd_loras(tmp_path_factory):
    """Two different LoRAs: attention + text encoder (alpha 2), and conv/ff layers (alpha 8)."""
    root = tmp_path_factory.mktemp("sd_loras")
    run(
        SD_BASE,
        root / "a",
        network_alpha=2,
        train_text_encoder=True,
        learning_rate=5e-2,
        max_train_steps=2,
        save_steps=0,
        output_name="a",
    )
    run(
        SD_BASE,
        root / "b",
        network_alpha=8,
        target_modules=WIDE_TARGETS,
        learning_rate=5e-2,
        max_train_steps=2,
        save_steps=0,
        seed=3,
        output_name="b",
    )
    return root


def outputs(pipe) -> list[torch.Tensor]:
    """What the merged weights decide: the UNet's noise prediction and the text encoder's states."""
    gen = torch.Generator().manual_seed(1)
    sample, states = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    ids = pipe.tokenizer(["a red circle", "a blue square"], return_tensors="pt", padding="max_length").input_ids
    with torch.no_grad():
        return [pipe.unet(sample, torch.tensor([10, 500]), states).sample, pipe.text_encoder(ids)[0]]


def assert_close(got: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 1e-5) -> None:
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=atol), (a - b).abs().max()


def test_lora_specs_parse_scales():
    assert parse_lora_spec("a.safetensors:0.8").scale == 0.8
    assert parse_lora_spec("a.safetensors").scale == 1.0
    assert str(parse_lora_spec("C:/x/a.safetensors").path) == "C:/x/a.safetensors"


def test_merged_sd_equals_base_plus_each_lora_at_its_scale(sd_loras, tmp_path):
    a = sd_loras / "a" / "a.kohya.safetensors"  # a kohya file merges like a diffusers one
    b = sd_loras / "b" / "pytorch_lora_weights.safetensors"
    out = tmp_path / "merged"
    assert (
        main(["merge", "--base", "preset:tiny-sd", "--lora", f"{a}:0.8", "--lora", f"{b}:0.5", "--output", str(out)])
        == 0
    )
    reference = tiny_sd_pipeline()  # diffusers' own LoRA layers, two adapters with their weights
    reference.load_lora_weights(sd_loras / "a", weight_name="pytorch_lora_weights.safetensors", adapter_name="a")
    reference.load_lora_weights(sd_loras / "b", weight_name="pytorch_lora_weights.safetensors", adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
    merged, base = outputs(tiny_sd_pipeline(out)), outputs(tiny_sd_pipeline())
    assert_close(merged, outputs(reference))
    assert not torch.allclose(merged[0], base[0], atol=1e-4) and not torch.allclose(merged[1], base[1], atol=1e-4)
    record = json.loads((out / "lora_merge.json").read_text())
    assert [(r["file"], r["scale"]) for r in record["loras"]] == [(str(a), 0.8), (str(b), 0.5)]


def test_single_file_checkpoint_loads_back_with_from_single_file(sd_loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    lora = sd_loras / "b" / "pytorch_lora_weights.safetensors"
    assert main(["merge", "--base", "preset:tiny-sd", "--lora", f"{lora}:0.7", "--output", str(tmp_path / "m")]) == 0
    for name in ("m.safetensors", "again.safetensors"):
        assert (
            main(["merge", "--base", "preset:tiny-sd", "--lora", f"{lora}:0.7", "--output", str(tmp_path / name)]) == 0
        )
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "again.safetensors").read_bytes()  # reproducible
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight" in keys  # LDM layout
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert json.loads(meta["lora_merge"])["loras"][0]["scale"] == 0.7
    single = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "m.safetensors"), config=str(preset_path("preset:tiny-sd")), local_files_only=True
    )
    folder = tiny_sd_pipeline(tmp_path / "m")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_sdxl_single_file_checkpoint_has_both_text_encoders_and_loads_back(tmp_path):
    """SDXL's layout: CLIP-L in the transformers layout, OpenCLIP bigG in its own (fused q/k/v, projection)."""
    from diffusers import StableDiffusionXLPipeline

    run(
        {**SD_BASE, "base_model": "preset:tiny-sdxl"},
        tmp_path / "lora",
        train_text_encoder=True,
        network_alpha=2,
        learning_rate=5e-2,
        max_train_steps=2,
        save_steps=0,
        output_name="xl",
    )
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    for output in ("m", "m.safetensors"):
        args = ["merge", "--base", "preset:tiny-sdxl", "--lora", f"{lora}:0.7", "--output", str(tmp_path / output)]
        assert main(args) == 0
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # SDXL's size/crop conditioning
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert {
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.positional_embedding",
    } <= keys
    single = StableDiffusionXLPipeline.from_single_file(
        str(tmp_path / "m.safetensors"), local_files_only=True, config=str(preset_path("preset:tiny-sdxl"))
    )
    folder = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "m"))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    base = StableDiffusionXLPipeline.from_pretrained(str(preset_path("preset:tiny-sdxl")))
    q_proj = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(single.text_encoder_2.state_dict()[q_proj], base.text_encoder_2.state_dict()[q_proj])


def test_trainer_trains_from_a_single_file_checkpoint(tmp_path):
    """base_model: <file>.safetensors with base_model_config trains exactly as the diffusers folder does."""
    single = tmp_path / "tiny-sd.safetensors"
    assert main(["merge", "--base", "preset:tiny-sd", "--output", str(single)]) == 0
    from_file = run(
        SD_BASE,
        tmp_path / "file",
        base_model=str(single),
        base_model_config=str(preset_path("preset:tiny-sd")),
        max_train_steps=3,
        save_steps=0,
    )
    from_folder = run(SD_BASE, tmp_path / "folder", max_train_steps=3, save_steps=0)
    assert from_file.summary.losses == from_folder.summary.losses
    a, b = (load_file(p / "pytorch_lora_weights.safetensors") for p in (tmp_path / "file", tmp_path / "folder"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def llm_loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_loras")
    run(LLM_BASE, root / "a", learning_rate=5e-2, max_train_steps=2, save_steps=0, network_alpha=8)
    run(
        LLM_BASE,
        root / "b",
        learning_rate=5e-2,
        max_train_steps=2,
        save_steps=0,
        seed=3,
        network_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    )
    return root


def logits(model) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_llm_equals_peft_adapters_at_their_scales(llm_loras, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert (
        main(
            [
                "merge",
                "--base",
                "preset:tiny-llm",
                "--lora",
                f"{llm_loras / 'a'}:0.8",
                "--lora",
                f"{llm_loras / 'b' / 'pytorch_lora_weights.safetensors'}:0.5",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(preset_path("preset:tiny-llm")), llm_loras / "a", adapter_name="a"
    )
    reference.load_adapter(llm_loras / "b", adapter_name="b")
    reference.base_model.set_adapter(["a", "b"])
    for module in reference.modules():
        if isinstance(module, LoraLayer):
            for name, scale in (("a", 0.8), ("b", 0.5)):
                if name in module.scaling:
                    module.set_scale(name, scale)
    merged = logits(AutoModelForCausalLM.from_pretrained(out))
    assert torch.allclose(merged, logits(reference), atol=1e-4)
    base = logits(AutoModelForCausalLM.from_pretrained(preset_path("preset:tiny-llm")))
    assert not torch.allclose(merged, base, atol=1e-3)
    assert (out / "tokenizer_config.json").is_file()


def test_convert_cli_both_ways(sd_loras, tmp_path, capsys):
    src = sd_loras / "a" / "pytorch_lora_weights.safetensors"
    assert main(["convert", "--to", "kohya", str(src), str(tmp_path / "k.safetensors")]) == 0
    assert main(["convert", "--to", "diffusers", str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors")]) == 0
    original, back = load_file(src), load_file(tmp_path / "d.safetensors")
    # the trainer and the converter both spell CLIP paths 'text_model.encoder...': an exact round trip
    assert set(back) == set(original) and any(k.startswith("text_encoder.text_model.") for k in back)
    assert all(torch.equal(back[k], original[k]) for k in back)
    assert (
        main(
            [
                "convert",
                "--to",
                "kohya",
                "--unet-names",
                "ldm",
                "--base-config",
                "preset:tiny-sd",
                str(src),
                str(tmp_path / "ldm.safetensors"),
            ]
        )
        == 0
    )
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(tmp_path / "ldm.safetensors"))
    assert (
        main(["convert", "--to", "diffusers", str(tmp_path / "ldm.safetensors"), str(tmp_path / "x.safetensors")])
        == ExitCode.MODEL_INVALID
    )
    assert "needs the UNet config (--base-config)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, code, message",
    [
        (
            ["merge", "--base", "preset:tiny-sd", "--lora", "{llm}", "--output", "{tmp}/o"],
            ExitCode.MODEL_INVALID,
            "peft",
        ),
        (
            ["merge", "--base", "preset:tiny-llm", "--lora", "{sd}", "--output", "{tmp}/o"],
            ExitCode.MODEL_INVALID,
            "an LLM takes a peft adapter",
        ),
        (
            ["merge", "--base", "preset:tiny-llm", "--lora", "{llm}", "--output", "{tmp}/o.safetensors"],
            ExitCode.MODEL_INVALID,
            "transformers folder",
        ),
        (["merge", "--base", "{tmp}/nothing", "--output", "{tmp}/o"], ExitCode.MODEL_INVALID, "does not exist"),
        (
            ["merge", "--base", "{tmp}/m.safetensors", "--output", "{tmp}/o"],
            ExitCode.CONFIG_INVALID,
            "needs --base-config",
        ),
        (["merge", "--base", "preset:tiny-sd", "--output", "{tmp}"], ExitCode.CONFIG_INVALID, "already exists"),
        (
            ["convert", "--to", "kohya", "--unet-names", "ldm", "{sd}", "{tmp}/k.safetensors"],
            ExitCode.CONFIG_INVALID,
            "needs --base-config",
        ),
    ],
)
def test_bad_merges_name_the_problem(sd_loras, llm_loras, tmp_path, capsys, args, code, message):
    (tmp_path / "m.safetensors").write_bytes(b"")
    fill = {
        "tmp": str(tmp_path),
        "sd": str(sd_loras / "a" / "pytorch_lora_weights.safetensors"),
        "llm": str(llm_loras / "a"),
    }
    assert main([a.format(**fill) for a in args]) == code
    assert message in capsys.readouterr().err
