"""The kohya/ComfyUI file of each diffusion-transformer family: the keys, shapes and alphas that kohya's
sd-scripts (networks/lora_flux.py, lora_sd3.py) and musubi-tuner (networks/lora_flux_2.py, lora_qwen_image.py,
convert_z_image_lora_to_comfy.py) write and ComfyUI's comfy/lora.py maps, for the tiny presets trained with
their default targets at rank 4, alpha 8. The tables below were written from those tools' naming rules
(`lora_unet_` + the original checkpoint's module path with '.' -> '_'; q/k/v trained apart and stored on the
fused original Linear: down stacked, up block-diagonal, alpha times the parts), not from this project's code.

Then: every file reads back to the trained weights exactly, and diffusers' own converters load it into the
same model as the main file, where diffusers has a converter for the family."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_trainer.formats.lora import from_diffusers

from .conftest import run
from .test_families import FAMILIES, base, draws

R, ALPHA = 4, 8.0


def qkv(name: str, width: int, parts: int = 3, extra_rows: int = 0) -> dict:
    """A fused module trained on `parts` projections of `width` rows each (extra untrained rows follow)."""
    return {name: ((parts * R, width), (parts * width + extra_rows, parts * R), parts * ALPHA)}


def plain(name: str, rows: int, cols: int) -> dict:
    return {name: ((R, cols), (rows, R), ALPHA)}


def flux1_double(i: int) -> dict:  # BFL: double_blocks.N.{img,txt}_{attn.qkv, attn.proj, mlp.0, mlp.2}
    out = {}
    for stream in ("img", "txt"):
        d = f"lora_unet_double_blocks_{i}_{stream}"
        out |= qkv(f"{d}_attn_qkv", 32) | plain(f"{d}_attn_proj", 32, 32)
        out |= plain(f"{d}_mlp_0", 128, 32) | plain(f"{d}_mlp_2", 32, 128)
    return out


EXPECTED = {  # kohya module -> (lora_down shape, lora_up shape, alpha)
    # FLUX.1: inner width 32, MLP 128; single_blocks.N.linear1 = q | k | v | mlp, only q, k, v trained
    "flux1": {
        **flux1_double(0),
        **flux1_double(1),
        **qkv("lora_unet_single_blocks_0_linear1", 32, extra_rows=128),
        **qkv("lora_unet_single_blocks_1_linear1", 32, extra_rows=128),
    },
    # SD3: SAI's joint_blocks.N.{x_block,context_block}.attn.{qkv,proj}; the last context block has no proj
    "sd3": {
        **qkv("lora_unet_joint_blocks_0_x_block_attn_qkv", 32),
        **plain("lora_unet_joint_blocks_0_x_block_attn_proj", 32, 32),
        **qkv("lora_unet_joint_blocks_0_context_block_attn_qkv", 32),
        **plain("lora_unet_joint_blocks_0_context_block_attn_proj", 32, 32),
        **qkv("lora_unet_joint_blocks_1_x_block_attn_qkv", 32),
        **plain("lora_unet_joint_blocks_1_x_block_attn_proj", 32, 32),
        **qkv("lora_unet_joint_blocks_1_context_block_attn_qkv", 32),
    },
    # Qwen-Image: the original names are diffusers' (musubi-tuner's lora_unet_transformer_blocks_N_attn_to_q)
    "qwen-image": {
        f"lora_unet_transformer_blocks_{i}_attn_{m}": ((R, 32), (32, R), ALPHA)
        for i in (0, 1)
        for m in ("to_q", "to_k", "to_v", "to_out_0")
    },
    # Z-Image: ComfyUI's layers.N.attention.{qkv,out} (musubi's converter), refiners included
    "z-image": {
        k: v
        for block in ("layers_0", "layers_1", "noise_refiner_0", "context_refiner_0")
        for k, v in {
            **qkv(f"lora_unet_{block}_attention_qkv", 32),
            **plain(f"lora_unet_{block}_attention_out", 32, 32),
        }.items()
    },
    # FLUX.2: double_blocks.N.img_attn.{qkv,proj}; single_blocks.N.linear1 (fused q|k|v|gated MLP: 3*32 + 2*96
    # rows) and linear2 (in: 32 + 96), both one Linear in diffusers too
    "flux2": {
        **qkv("lora_unet_double_blocks_0_img_attn_qkv", 32),
        **plain("lora_unet_double_blocks_0_img_attn_proj", 32, 32),
        **{f"lora_unet_single_blocks_{i}_linear1": ((R, 32), (288, R), ALPHA) for i in (0, 1)},
        **{f"lora_unet_single_blocks_{i}_linear2": ((R, 128), (32, R), ALPHA) for i in (0, 1)},
    },
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """family -> (output folder, recipe), trained once for the module."""
    out = {}
    for family in sorted(FAMILIES):
        folder = tmp_path_factory.mktemp(family)
        out[family] = (folder, run(base(family), folder, max_train_steps=2, save_steps=0, learning_rate=5e-2))
    return out


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_the_kohya_file_has_the_keys_those_tools_write(trained, family):
    folder, _ = trained[family]
    with safe_open(str(folder / f"{folder.name}.kohya.safetensors"), "pt") as f:
        found = {}
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            module, _, kind = key.partition(".")
            found.setdefault(module, {})[kind] = f.get_tensor(key)
        meta = f.metadata()
    assert sorted(found) == sorted(EXPECTED[family])
    for module, (down, up, alpha) in EXPECTED[family].items():
        t = found[module]
        assert (tuple(t["lora_down.weight"].shape), tuple(t["lora_up.weight"].shape)) == (down, up), module
        assert t["alpha"].shape == () and float(t["alpha"]) == alpha, module
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert "lora_adapter_metadata" not in meta  # diffusers would read the file as its own format
    assert meta["ss_network_module"].startswith("networks.lora_") and meta["modelspec.architecture"].endswith("/lora")


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_the_kohya_file_reads_back_to_the_trained_weights(trained, family):
    from lora_trainer.formats.native import from_native

    folder, recipe = trained[family]
    main = from_diffusers(
        load_file(folder / "pytorch_lora_weights.safetensors"),
        safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt").metadata(),
    )
    layout = native_layout(recipe.task.family)
    back = from_native(load_file(folder / f"{folder.name}.kohya.safetensors"), layout)
    assert back.keys() == main.keys()
    for key, weight in main.items():
        assert back[key].rank == weight.rank  # the block-diagonal parts split back into rank-r LoRAs
        assert torch.allclose(back[key].delta(), weight.delta(), atol=1e-7), key
    # SD3's last block computes context queries that nothing reads: their LoRA stays zero, and is kept
    zero = [key for key, weight in main.items() if not weight.up.abs().sum()]
    assert zero == ([("transformer", "transformer_blocks.1.attn.add_q_proj")] if family == "sd3" else []), zero


def native_layout(fam):
    return fam.native_layout(fam.parts.denoiser)


@pytest.mark.parametrize("family", ["qwen-image", "z-image", "flux2"])
def test_diffusers_loads_the_kohya_file_into_the_same_model_as_the_main_file(trained, family):
    """diffusers converts these families' kohya/ComfyUI files itself (its lora_conversion_utils)."""
    import diffusers

    from lora_trainer.presets import preset_path

    folder, recipe = trained[family]
    fam = recipe.task.family
    batch = recipe.task.collate([recipe.dataset[(0, 0)], recipe.dataset[(1, 0)]])
    with torch.no_grad():
        latents = fam.latents(fam.encode_images(batch["pixel_values"]), draws(0, batch))
    outputs = []
    for file in ("pytorch_lora_weights.safetensors", f"{folder.name}.kohya.safetensors"):
        pipe = getattr(diffusers, FAMILIES[family][1]).from_pretrained(preset_path(FAMILIES[family][0]))
        pipe.load_lora_weights(str(folder / file))
        fam.parts.denoiser = pipe.transformer.eval()
        with torch.no_grad():
            outputs.append(fam.predict(latents, torch.tensor([0.3, 0.8]), batch["prompt"]))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


def test_diffusers_reads_a_full_width_flux1_kohya_file_as_the_same_lora():
    """diffusers' FLUX.1 kohya converter only handles FLUX.1's real widths (3072, MLP 12288): a state dict of
    one double and one single block at that width, trained apart on q/k/v, written fused, converted back."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from lora_trainer.families.flux1 import bfl_layout
    from lora_trainer.formats.lora import LoraWeight
    from lora_trainer.formats.native import to_native

    config = SimpleNamespace(num_attention_heads=24, attention_head_dim=128, num_layers=1, num_single_layers=1)
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "transformer_blocks.0.attn.to_q": (3072, 3072),
        "transformer_blocks.0.attn.to_k": (3072, 3072),
        "transformer_blocks.0.attn.to_v": (3072, 3072),
        "transformer_blocks.0.attn.to_out.0": (3072, 3072),
        "transformer_blocks.0.ff.net.0.proj": (12288, 3072),
        "single_transformer_blocks.0.attn.to_q": (3072, 3072),
        "single_transformer_blocks.0.attn.to_k": (3072, 3072),
        "single_transformer_blocks.0.attn.to_v": (3072, 3072),
        "single_transformer_blocks.0.proj_mlp": (12288, 3072),
    }
    ours = {
        ("transformer", p): LoraWeight(
            torch.randn(R, i, generator=generator), torch.randn(o, R, generator=generator), ALPHA
        )
        for p, (o, i) in shapes.items()
    }
    converted = _convert_kohya_flux_lora_to_diffusers(to_native(ours, bfl_layout(config)))
    for (_, path), weight in ours.items():
        a, b = converted[f"transformer.{path}.lora_A.weight"], converted[f"transformer.{path}.lora_B.weight"]
        assert torch.allclose(b.float() @ a.float(), weight.delta(), atol=1e-4), path  # alpha/r baked in


def test_a_flux1_kohya_file_with_final_layer_loras_says_which_tools_take_it(tmp_path, caplog):
    """sd-scripts' LoRA network has no final_layer modules (checked with its own loaders at 48d368f: the
    strict load of flux_minimal_inference.py raises on these keys, flux_merge_lora.py applies them)."""
    targets = ["attn.to_q", "proj_out"]  # proj_out: the single blocks' and the top-level one
    run(base("flux1"), tmp_path, max_train_steps=1, save_steps=0, target_modules=targets, save_formats=["kohya"])
    err = caplog.text
    assert "holds LoRAs of transformer.proj_out (BFL's final_layer)" in err
    assert "single_transformer_blocks.0.proj_out" in err
    with safe_open(next(tmp_path.glob("*.kohya.safetensors")), "pt") as f:
        assert "lora_unet_final_layer_linear.alpha" in set(f.keys())

    caplog.clear()
    run(base("flux1"), tmp_path / "default", max_train_steps=1, save_steps=0, save_formats=["kohya"])
    assert "final_layer" not in caplog.text
