"""kohya/A1111/ComfyUI LoRA files: names (table-driven, against real module lists and diffusers' own LDM
converter), the file every text-to-image run writes, round trips, and loading with diffusers' loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.errors import ModelError
from lora_trainer.formats import detect_format, read_lora, write_lora
from lora_trainer.formats.kohya import kohya_name, parse_kohya_name, to_kohya
from lora_trainer.formats.ldm import unet_from_ldm, unet_to_ldm
from lora_trainer.formats.lora import LoraWeight, from_diffusers
from lora_trainer.presets import preset_path

from .conftest import SD_BASE, generate, run, tiny_sd_pipeline

# LoRA on attention, feed-forward, projections and ResNet convs (3x3: kohya's LoCon "conv_dim" keys)
WIDE_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
]


# -- configs of real UNet layouts (no weights needed: only names)
def sd15_unet_config() -> dict:
    return {
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "layers_per_block": 2,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
    }


def sdxl_unet_config() -> dict:
    return {
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [320, 640, 1280],
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "projection_class_embeddings_input_dim": 2816,
        "addition_time_embed_dim": 256,
    }


def tiny_unet_config() -> dict:
    from diffusers import UNet2DConditionModel

    return dict(UNet2DConditionModel.load_config(preset_path("preset:tiny-sd"), subfolder="unet"))


def empty_unet(config: dict):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})


LAYOUTS = {"tiny": tiny_unet_config, "sd15": sd15_unet_config, "sdxl": sdxl_unet_config}


def lora_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize(
    "component, path, ldm, expected",
    [
        (
            "unet",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            False,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        ),
        (
            "unet",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            True,
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        ),
        ("unet", "down_blocks.1.attentions.1.proj_in", True, "lora_unet_input_blocks_5_1_proj_in"),
        ("unet", "down_blocks.1.resnets.0.conv1", True, "lora_unet_input_blocks_4_0_in_layers_2"),
        ("unet", "down_blocks.1.resnets.0.time_emb_proj", True, "lora_unet_input_blocks_4_0_emb_layers_1"),
        ("unet", "down_blocks.1.resnets.0.conv_shortcut", True, "lora_unet_input_blocks_4_0_skip_connection"),
        ("unet", "down_blocks.2.downsamplers.0.conv", True, "lora_unet_input_blocks_9_0_op"),
        (
            "unet",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
            True,
            "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0",
        ),
        ("unet", "mid_block.resnets.1.conv2", True, "lora_unet_middle_block_2_out_layers_3"),
        ("unet", "up_blocks.0.upsamplers.0.conv", True, "lora_unet_output_blocks_2_1_conv"),
        (
            "unet",
            "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj",
            True,
            "lora_unet_output_blocks_5_1_transformer_blocks_0_ff_net_0_proj",
        ),
        ("unet", "up_blocks.1.upsamplers.0.conv", True, "lora_unet_output_blocks_5_2_conv"),
        ("unet", "up_blocks.3.resnets.2.conv1", True, "lora_unet_output_blocks_11_0_in_layers_2"),
        (
            "text_encoder",
            "encoder.layers.11.self_attn.q_proj",
            False,
            "lora_te_text_model_encoder_layers_11_self_attn_q_proj",
        ),
        ("text_encoder", "text_model.encoder.layers.0.mlp.fc1", False, "lora_te_text_model_encoder_layers_0_mlp_fc1"),
    ],
)
def test_kohya_names_for_sd15(component, path, ldm, expected):
    """The names A1111/ComfyUI/kohya use for real SD 1.5 LoRAs."""
    config = sd15_unet_config() if ldm else None
    assert kohya_name(component, path, unet_config=config) == expected
    back = parse_kohya_name(expected, config)
    assert back[0] == component and back[1].removeprefix("text_model.") == path.removeprefix("text_model.")


def test_two_text_encoders_use_te1_and_te2():
    assert kohya_name("text_encoder", "encoder.layers.0.self_attn.q_proj", two_text_encoders=True).startswith(
        "lora_te1_"
    )
    assert kohya_name("text_encoder_2", "encoder.layers.0.self_attn.q_proj").startswith("lora_te2_")
    assert parse_kohya_name("lora_te2_text_model_encoder_layers_0_mlp_fc2")[0] == "text_encoder_2"


@pytest.mark.parametrize("layout", ["tiny", "sd15", "sdxl"])
@pytest.mark.parametrize("ldm", [False, True], ids=["diffusers-names", "ldm-names"])
def test_every_unet_module_name_survives_the_round_trip(layout, ldm):
    config = LAYOUTS[layout]()
    names = lora_modules(empty_unet(config))
    assert len(names) > 60
    for path in names:
        name = kohya_name("unet", path, unet_config=config if ldm else None)
        assert parse_kohya_name(name, config) == ("unet", path), name


def test_every_text_encoder_module_name_survives_the_round_trip():
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(num_hidden_layers=2))
    for path in lora_modules(model):
        component, back = parse_kohya_name(kohya_name("text_encoder", path))
        assert component == "text_encoder" and back.removeprefix("text_model.") == path.removeprefix("text_model.")


@pytest.mark.parametrize("layout", ["tiny", "sd15", "sdxl"])
def test_ldm_unet_layout_matches_diffusers_own_single_file_converter(layout):
    """Our diffusers->LDM map, read back by diffusers' LDM->diffusers converter, gives every key back."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = LAYOUTS[layout]()
    keys = list(empty_unet(config).state_dict())
    ldm = {"model.diffusion_model." + unet_to_ldm(k, config): torch.tensor(float(i)) for i, k in enumerate(keys)}
    assert len(ldm) == len(keys)
    back = convert_ldm_unet_checkpoint(ldm, config)
    assert {k: float(v) for k, v in back.items()} == {k: float(i) for i, k in enumerate(keys)}
    assert all(unet_from_ldm(unet_to_ldm(k, config), config) == k for k in keys)


def test_a_name_that_cannot_round_trip_is_refused():
    weight = LoraWeight(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)
    with pytest.raises(ModelError, match="cannot be written unambiguously"):
        to_kohya({("unet", "my_block.to_q"): weight})


def test_lycoris_and_dora_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "loha.safetensors"
    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2), "lora_unet_conv_in.alpha": torch.tensor(1.0)}, path)
    with pytest.raises(ModelError, match="LoHa/LoKr/DoRA"):
        read_lora(path)


# -- the file a run writes, and what loads it
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with alpha != rank, the text encoder and conv layers trained: everything a converter can get wrong."""
    out = tmp_path_factory.mktemp("kohya") / "run"
    recipe = run(
        SD_BASE,
        out,
        network_alpha=2,
        train_text_encoder=True,
        target_modules=WIDE_TARGETS,
        learning_rate=5e-2,
        max_train_steps=2,
        save_steps=0,
        output_name="my_lora",
    )
    return recipe, out


def test_every_run_writes_a_kohya_file_with_the_real_alpha(trained):
    recipe, out = trained
    path = out / "my_lora.kohya.safetensors"
    assert path.is_file()
    assert any(a.format == "kohya" and a.path == str(path) for a in recipe.summary.artifacts)
    with safe_open(str(path), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
        alphas = {k: float(handle.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert detect_format(dict.fromkeys(keys)) == "kohya"
    names = {k.split(".")[0] for k in keys}
    assert keys == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in names  # a 3x3 conv: LoCon-style keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert set(alphas.values()) == {2.0}
    diffusers_keys = load_file(out / "pytorch_lora_weights.safetensors")
    assert 3 * len(diffusers_keys) // 2 == len(keys)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_module"]) == ("4", "2", "networks.lora")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("sd_v1", "stable-diffusion-v1/lora")
    assert (meta["ss_output_name"], meta["ss_sd_model_name"], meta["modelspec.resolution"]) == (
        "my_lora",
        "preset:tiny-sd",
        "16x16",
    )
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.date"]


def test_save_formats_diffusers_only_writes_no_kohya_file(tmp_path):
    run(SD_BASE, tmp_path, max_train_steps=1, save_steps=0, save_formats=["diffusers"])
    assert not list(tmp_path.glob("*.kohya.safetensors"))


def test_kohya_to_diffusers_to_kohya_is_the_identity(trained, tmp_path):
    _, out = trained
    original = out / "my_lora.kohya.safetensors"
    write_lora(tmp_path / "d.safetensors", read_lora(original), "diffusers")
    assert read_lora(tmp_path / "d.safetensors").format == "diffusers"
    write_lora(tmp_path / "k.safetensors", read_lora(tmp_path / "d.safetensors"), "kohya")
    a, b = load_file(original), load_file(tmp_path / "k.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(original), "pt") as f1, safe_open(str(tmp_path / "k.safetensors"), "pt") as f2:
        assert f1.metadata() == f2.metadata()


def test_diffusers_kohya_loader_reads_the_kohya_file_like_the_diffusers_file(trained):
    recipe, out = trained
    base, from_diffusers_file, from_kohya_file = tiny_sd_pipeline(), tiny_sd_pipeline(), tiny_sd_pipeline()
    from_diffusers_file.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    from_kohya_file.load_lora_weights(out, weight_name="my_lora.kohya.safetensors")  # diffusers' non-diffusers path
    images = generate(from_diffusers_file)
    assert not torch.allclose(generate(base), images, atol=1e-3)
    assert torch.equal(images, generate(from_kohya_file))
    # and both equal the UNet and text encoder as trained (every module loaded, alpha 2 != rank 4 applied)
    unet, text_encoder = recipe.task.family.parts.denoiser.eval(), recipe.task.family.parts.text_encoders[0].eval()
    sample, t, states = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    ids = from_kohya_file.tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = unet(sample, t, states).sample
        for pipe in (from_diffusers_file, from_kohya_file):
            assert torch.allclose(pipe.unet(sample, t, states).sample, expected, atol=1e-5)
            assert torch.allclose(pipe.text_encoder(ids)[0], text_encoder(ids)[0], atol=1e-5)


def test_ldm_spelled_file_loads_in_diffusers_given_the_unet_config(trained, tmp_path):
    """The LDM spelling is computed from the tiny UNet's config (1 layer per block, 2 blocks, not SD 1.5's
    4x2); diffusers maps it back with the same config and gets the same model."""
    _, out = trained
    config = tiny_unet_config()
    write_lora(tmp_path / "ldm.safetensors", read_lora(out / "pytorch_lora_weights.safetensors"), "kohya", config)
    keys = load_file(tmp_path / "ldm.safetensors").keys()
    assert any(k.startswith("lora_unet_input_blocks_3_1_") for k in keys)  # SD 1.5 would say input_blocks_1_1
    assert not any("down_blocks" in k for k in keys)
    ldm, reference = tiny_sd_pipeline(), tiny_sd_pipeline()
    ldm.load_lora_weights(tmp_path, weight_name="ldm.safetensors", unet_config=ldm.unet.config)
    reference.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    assert torch.equal(generate(ldm), generate(reference))
    assert (
        read_lora(tmp_path / "ldm.safetensors", config).loras.keys()
        == read_lora(out / "my_lora.kohya.safetensors").loras.keys()
    )


def test_the_diffusers_file_spells_every_module_alike(trained):
    """Regression: attention keys were 'lora.down', conv/ff keys 'lora_A'; diffusers' loader then dropped
    every attention LoRA without an error."""
    _, out = trained
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert not [k for k in keys if "lora_A" in k or "lora_B" in k]
    lora = from_diffusers(load_file(out / "pytorch_lora_weights.safetensors"))
    assert len(lora) == len(keys) // 2


def test_loading_without_alpha_means_alpha_equals_rank():
    weight = LoraWeight(torch.ones(2, 3), torch.ones(5, 2), 2.0)
    tensors = to_kohya({("unet", "conv_in"): weight})
    del tensors["lora_unet_conv_in.alpha"]
    from lora_trainer.formats.kohya import from_kohya

    assert from_kohya(tensors)[("unet", "conv_in")].alpha == 2.0  # the rank


def test_sdxl_kohya_file_uses_ldm_names_and_loads_like_the_diffusers_file(tmp_path):
    """kohya's SDXL LoRAs name the UNet in LDM spelling (input_blocks_...) and the encoders te1/te2;
    diffusers' SDXL loader maps them back with the UNet config."""
    from diffusers import StableDiffusionXLPipeline

    run(
        {**SD_BASE, "base_model": "preset:tiny-sdxl"},
        tmp_path,
        train_text_encoder=True,
        network_alpha=2,
        target_modules=WIDE_TARGETS,
        learning_rate=5e-2,
        max_train_steps=2,
        save_steps=0,
        output_name="xl",
    )
    with safe_open(str(tmp_path / "xl.kohya.safetensors"), "pt") as handle:
        names, meta = {k.split(".")[0] for k in handle.keys()}, handle.metadata()  # noqa: SIM118 - safe_open is not iterable
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert not any("down_blocks" in n for n in names)

    def pipe(weight_name):
        p = StableDiffusionXLPipeline.from_pretrained(preset_path("preset:tiny-sdxl"))
        p.load_lora_weights(tmp_path, weight_name=weight_name)
        return p

    a, b = pipe("pytorch_lora_weights.safetensors"), pipe("xl.kohya.safetensors")
    sample, t, states = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 80)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}
    ids = a.tokenizer_2("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(
            a.unet(sample, t, states, added_cond_kwargs=added).sample,
            b.unet(sample, t, states, added_cond_kwargs=added).sample,
            atol=1e-5,
        )
        assert torch.equal(a.text_encoder(ids)[0], b.text_encoder(ids)[0])
        assert torch.equal(
            a.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2],
            b.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2],
        )
