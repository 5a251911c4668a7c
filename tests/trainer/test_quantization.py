"""Quantized frozen bases (`base_quantization`) on CPU: every mode that runs here, for the LLM and the UNet.

The frozen weights shrink by the format's factor, the quantized model's outputs stay close to the
full-precision one's, LoRA trains in fp32 on peft's quantized layers and resumes exactly, the files are
those of an unquantized run, a mode the device cannot run is refused before anything loads, and an adapter
trained on a quantized base merges into the full-precision base."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lora_trainer.config import build_config
from lora_trainer.errors import ConfigError, ExitCode
from lora_trainer.presets import preset_path
from lora_trainer.quantization import BACKENDS, QuantizedBase, load_kwargs, stored_bytes
from lora_trainer.tasks import task_class

from .conftest import LLM_BASE, SD_BASE, assert_resumes_exactly, make_config, run
from .test_bad_inputs import run_cli
from .test_families import base as family_base
from .test_families import draws
from .test_text_to_image import files_under

MODES = sorted(BACKENDS)  # all run on CPU for an LLM
# relative error of the logits of a 1-layer, 512-wide random Llama: measured int8 0.016, fp8 0.055, nf4 0.20
# (4-bit NormalFloat keeps ~10% of a Gaussian weight's energy as error per layer); twice that is the bound
CLOSE = {"int8": 0.035, "fp8": 0.11, "nf4": 0.4}
PEFT_LAYERS = {"int8": "TorchaoLoraLinear", "fp8": "TorchaoLoraLinear", "nf4": "Linear4bit"}


@pytest.fixture(scope="module")
def llama_512(tmp_path_factory):
    """One Llama layer 512 wide: matrices large enough that the formats' scales are their usual share."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama512")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def layer_weight_bytes(model) -> int:
    """Bytes of the decoder layers' projection weights: what base_quantization quantizes."""
    return sum(stored_bytes(m.weight) for name, m in model.named_modules() if name.endswith("_proj"))


@pytest.mark.parametrize("mode", MODES)
def test_frozen_weights_shrink_by_the_formats_factor_and_outputs_stay_close(llama_512, mode):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(llama_512)
    quantized = AutoModelForCausalLM.from_pretrained(llama_512, **load_kwargs(mode, "transformers", torch.float32))
    ratio = layer_weight_bytes(quantized) / layer_weight_bytes(full)
    nominal = BACKENDS[mode].bits / 32
    assert nominal <= ratio <= 1.1 * nominal, ratio  # the data plus its scales (per row; nf4: per 64, quantized)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = full(ids).logits, quantized(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < CLOSE[mode]


@pytest.mark.parametrize("mode", MODES)
def test_lora_on_a_quantized_llm_trains_in_fp32_resumes_exactly_and_writes_the_usual_files(tmp_path, mode):
    recipe = assert_resumes_exactly(LLM_BASE, tmp_path, base_quantization=mode)
    q_proj = recipe.task.causal_lm.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == PEFT_LAYERS[mode]  # peft's LoRA layer over the quantized weight
    assert q_proj.lora_A["default"].weight.dtype == torch.float32
    assert type(q_proj.base_layer.weight).__name__ in ("Int8Tensor", "Float8Tensor", "Params4bit")
    run(LLM_BASE, tmp_path / "plain")
    assert files_under(tmp_path / "straight") == files_under(tmp_path / "plain")
    with (
        safe_open(tmp_path / "straight/pytorch_lora_weights.safetensors", "pt") as q,
        safe_open(tmp_path / "plain/pytorch_lora_weights.safetensors", "pt") as p,
    ):
        assert sorted(q.keys()) == sorted(p.keys())
        assert q.metadata()["base_quantization"] == mode and p.metadata()["base_quantization"] == "none"


def test_the_loss_falls_on_a_4bit_base(tmp_path):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    recipe = run(
        LLM_BASE,
        tmp_path,
        base_quantization="nf4",
        train_data_dir=LLM_BASE["train_data_dir"] + "/chat.jsonl",
        max_train_steps=40,
        learning_rate=1e-2,
        lora_rank=8,
        save_steps=0,
        target_modules=targets,
    )
    losses = [loss for _, loss in recipe.summary.losses]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)  # as on the full-precision base (test_text_generation)


@pytest.mark.parametrize(("family", "mode"), [("sd", "int8"), ("sd", "fp8"), ("flux1", "int8")])
def test_lora_on_a_quantized_denoiser_trains_and_resumes_exactly(tmp_path, family, mode):
    """The UNet (sd's own loader) and a diffusion transformer (the families' shared loader)."""
    base = SD_BASE if family == "sd" else family_base(family)
    recipe = assert_resumes_exactly(base, tmp_path, base_quantization=mode)
    to_q = next(m for name, m in recipe.task.family.parts.denoiser.named_modules() if name.endswith(".to_q"))
    assert type(to_q).__name__ == "TorchaoLoraLinear" and to_q.lora_A["default"].weight.dtype == torch.float32
    assert any(f.endswith(".kohya.safetensors") for f in files_under(tmp_path / "resumed"))


def test_a_mode_the_device_cannot_run_stops_the_run_before_anything_loads(tmp_path, capsys, monkeypatch):
    """diffusers quantizes to 4 bits only on a CUDA GPU: nf4 of a UNet on CPU is refused at start, exit 2."""
    loaded = []
    monkeypatch.setattr("lora_trainer.recipe.TrainingRecipe.setup", lambda self: loaded.append(self))
    code, err = run_cli(tmp_path, capsys, SD_BASE, base_quantization="nf4", device="cpu")
    assert code == ExitCode.CONFIG_INVALID and "ConfigInvalid" in err
    assert "base_quantization: nf4 (bitsandbytes 4-bit NormalFloat with double quantization) cannot run on cpu" in err
    assert "diffusers" in err and "needs a CUDA GPU" in err
    assert loaded == []


def test_a_missing_backend_package_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    problem = QuantizedBase("int8", "transformers", "cpu").problem()
    assert "base_quantization: int8" in problem and "needs the torchao package, which is not installed" in problem


def test_the_locked_libraries_run_every_llm_mode_on_cpu():
    for mode in MODES:
        cfg = build_config({**LLM_BASE, "output_dir": "unused", "base_quantization": mode, "device": "cpu"})
        assert [n.problem() for n in task_class(cfg.task_type).library_needs(cfg)] == [None]


def test_an_adapter_trained_on_a_4bit_base_merges_into_the_full_precision_base(tmp_path):
    """lora-merge adds the LoRA to the fp32 weights: the merged model is exactly base + LoRA, and differs from
    the model that trained (the 4-bit base + LoRA) only by the base's quantization error."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_trainer.merge.cli import main

    recipe = run(LLM_BASE, tmp_path / "run", base_quantization="nf4", learning_rate=5e-2, max_train_steps=3)
    merged_dir = tmp_path / "merged"
    assert (
        main(["merge", "--base", "preset:tiny-llm", "--lora", str(tmp_path / "run"), "--output", str(merged_dir)]) == 0
    )
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    base = preset_path("preset:tiny-llm")
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
        full = AutoModelForCausalLM.from_pretrained(base)
        plain = full(ids).logits
        adapted = PeftModel.from_pretrained(full, tmp_path / "run")(input_ids=ids).logits
        trained = recipe.task.model.eval()(input_ids=ids).logits
    assert torch.allclose(merged, adapted, atol=1e-5)
    assert not torch.allclose(merged, plain, atol=1e-3)  # the LoRA moved it
    quantization_error = (merged - trained).norm()
    assert 0 < quantization_error < CLOSE["nf4"] * merged.norm()


def test_a_single_file_sd_checkpoint_cannot_be_quantized_as_it_loads(tmp_path):
    from lora_trainer.errors import ConfigError
    from lora_trainer.families.sd import StableDiffusion

    checkpoint = tmp_path / "sd15.safetensors"
    checkpoint.write_bytes(b"")  # never read: the config is refused first
    cfg = build_config(
        {**SD_BASE, "output_dir": "unused", "base_model": str(checkpoint), "base_model_config": "preset:tiny-sd"}
        | {"base_quantization": "int8"}
    )
    with pytest.raises(ConfigError, match="base_quantization: int8 .* save it as a folder first"):
        StableDiffusion(cfg).check_config()


def test_the_8b_bench_preset_has_llama_3_8bs_shape():
    """benchmarks/bench_llm.py --arch real: built on the meta device (no memory), 8.03B parameters as Llama-3-8B."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_trainer.presets.llm import llama_8b_config

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**llama_8b_config(128256)))
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248


def text_encoders(base: dict, tmp_path, **keys):
    """The family of a config with its tokenizers and text encoders loaded on the CPU."""
    from lora_trainer.families import detect_family

    cfg = make_config(base, tmp_path / "unused", **keys)
    family = detect_family(cfg)(cfg)
    family.load_tokenizers()
    family.load_text_encoders(torch.device("cpu"), torch.float32)
    return family


def linear_bytes(family) -> int:
    return sum(
        stored_bytes(m.weight)
        for e in family.parts.text_encoders
        for m in e.modules()
        if isinstance(m, torch.nn.Linear)
    )


@pytest.mark.parametrize(("family", "mode"), [("sd", "int8"), ("flux1", "int8"), ("flux1", "fp8")])
def test_quantized_text_encoders_store_fewer_bytes_and_embed_close_to_the_full_ones(tmp_path, family, mode):
    """quantize_text_encoders loads CLIP (sd; flux1's pooled encoder) and T5 (flux1) in base_quantization's
    format through transformers' loaders, the LLM's path (nf4 included, tested there). nf4 is not tested on
    these encoders: bitsandbytes' CPU kernel needs layers at least 64 features wide, the tiny presets' are 32."""
    base = SD_BASE if family == "sd" else family_base(family)
    full = text_encoders(base, tmp_path, base_quantization=mode)
    quantized = text_encoders(base, tmp_path, base_quantization=mode, quantize_text_encoders=True)
    assert linear_bytes(quantized) <= QUANTIZED_TEXT_BYTES[mode] * linear_bytes(full)
    prompts = ["a photo of a cat", "two dogs on a red sofa, oil painting"]
    with torch.no_grad():
        expected = full.encode_prompts(full.prompt_batch(prompts))
        got = quantized.encode_prompts(quantized.prompt_batch(prompts))
    for name, want in expected.items():
        error = ((got[name] - want).norm() / want.norm()).item()
        assert error < CLOSE[mode], (name, error)


# the tiny encoders' linear weights: measured int8 0.284, fp8 0.277 of fp32 (rows 32-37 wide, so each row's
# scale is a larger share than in real encoders); prompt embeddings' relative error 0.007-0.011 (int8),
# 0.035-0.048 (fp8)
QUANTIZED_TEXT_BYTES = {"int8": 0.32, "fp8": 0.32}


@pytest.mark.parametrize(("family", "mode"), [("sd", "int8"), ("flux1", "fp8")])
def test_a_run_with_quantized_text_encoders_trains_and_caches_their_embeddings_apart(tmp_path, family, mode):
    base = SD_BASE if family == "sd" else family_base(family)
    cache = tmp_path / "cache"
    keys = dict(max_train_steps=2, save_steps=0, cache_text_encoder_outputs=True, cache_dir=str(cache))

    def text_entries() -> int:
        return sum(1 for _ in cache.rglob("*.safetensors"))  # latents are not cached here: text entries only

    run(base, tmp_path / "full", base_quantization=mode, **keys)
    full = text_entries()
    recipe = run(base, tmp_path / "quantized", base_quantization=mode, quantize_text_encoders=True, **keys)
    assert text_entries() == 2 * full  # the quantized encoders' outputs are other entries, never served for these
    assert all(loss == loss for _, loss in recipe.summary.losses)


def test_quantize_text_encoders_needs_a_format_and_frozen_encoders():
    with pytest.raises(ConfigError, match="'quantize_text_encoders' needs a base_quantization format"):
        build_config({**SD_BASE, "quantize_text_encoders": True})
    with pytest.raises(ConfigError, match="'quantize_text_encoders' cannot be used with train_text_encoder"):
        build_config(
            {**SD_BASE, "quantize_text_encoders": True, "base_quantization": "int8", "train_text_encoder": True}
        )


@pytest.mark.parametrize(("model", "mode"), [("llm", "int8"), ("llm", "fp8"), ("sd", "int8"), ("flux1", "fp8")])
def test_the_backward_pass_keeps_quantized_weights_not_full_precision_copies(tmp_path, model, mode):
    """torchao dequantizes above autograd, which then kept each layer's fp32 copy until backward: as much memory
    as an unquantized base. quantization.FrozenQuantizedLinear keeps the stored weight instead."""
    base = {"llm": LLM_BASE, "sd": SD_BASE}.get(model) or family_base(model)
    recipe = run(base, tmp_path, base_quantization=mode, max_train_steps=1, save_steps=0)
    task = recipe.task
    module = task.model if model == "llm" else task.family.parts.denoiser
    quantized = [
        m.weight for m in module.modules() if isinstance(m, torch.nn.Linear) and "torchao" in type(m.weight).__module__
    ]
    batch = task.collate([recipe.dataset[(i, 0)] for i in range(2)])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = task.loss(batch, draws(0, batch) if model != "llm" else None)
    # full-precision copies: the dequantized weight, or (int8) its stored integers cast to float before scaling
    full = [w.dequantize() for w in quantized] + [w.qdata.float() for w in quantized if hasattr(w, "qdata")]
    copies = [
        tuple(t.shape)
        for t in saved
        if type(t) is torch.Tensor
        and t.dim() == 2
        and any(t.shape == w.shape and torch.equal(t, w) or t.shape == w.T.shape and torch.equal(t, w.T) for w in full)
    ]
    assert quantized and not copies
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.params)


# -- nf4 under distributed_strategy fsdp: torchao's NF4Tensor, which FSDP2 shards (tests/trainer/test_fsdp.py
# trains with it over two processes)


def test_nf4_under_fsdp_is_torchaos_nf4tensor_of_the_same_size_and_closeness(llama_512):
    from torchao.quantization import NF4Tensor
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(llama_512)
    sharded = AutoModelForCausalLM.from_pretrained(
        llama_512, **load_kwargs("nf4", "transformers", torch.float32, "fsdp")
    )
    projections = [m.weight for name, m in sharded.named_modules() if name.endswith("_proj")]
    assert projections and all(isinstance(w, NF4Tensor) and not w.requires_grad for w in projections)
    ratio = layer_weight_bytes(sharded) / layer_weight_bytes(full)
    assert 4 / 32 <= ratio <= 1.1 * 4 / 32, ratio  # 4 bits, int8 scales per 64, their scales per 256 x 64
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = full(ids).logits, sharded(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < CLOSE["nf4"]


def test_nf4_under_fsdp_quantizes_the_weights_of_whole_scale_groups_of_a_diffusion_transformer(tmp_path):
    """NF4Tensor needs 64 x 256 values per scale group: the 256-wide attention and MLP weights are quantized,
    the few smaller ones (here the input, output and pooled-text embedder layers) stay full precision. It runs
    on CPU, unlike bitsandbytes' nf4 through diffusers."""
    from diffusers import FluxTransformer2DModel
    from torchao.quantization import NF4Tensor

    torch.manual_seed(0)
    FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        axes_dims_rope=[16, 24, 24],
    ).save_pretrained(tmp_path)
    model = FluxTransformer2DModel.from_pretrained(tmp_path, **load_kwargs("nf4", "diffusers", torch.float32, "fsdp"))
    linears = {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {name for name, w in linears.items() if isinstance(w, NF4Tensor)}
    assert quantized == {name for name, w in linears.items() if w.numel() % (64 * 256) == 0}
    assert "transformer_blocks.0.attn.to_q" in quantized and "single_transformer_blocks.0.proj_out" in quantized
    assert set(linears) - quantized == {"x_embedder", "proj_out", "time_text_embed.text_embedder.linear_1"}
    assert QuantizedBase("nf4", "diffusers", "cpu", "fsdp").problem() is None


def test_an_nf4_weight_is_split_by_fsdp_only_into_row_slices_of_whole_scale_groups():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_, to_nf4

    from lora_trainer.distributed import ShardedBase, World

    def weight(rows: int, cols: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(to_nf4(torch.randn(rows, cols)), requires_grad=False)

    two, four = ShardedBase(World(0, 2)), ShardedBase(World(0, 4))
    assert two.splits(weight(512, 64)) and not four.splits(weight(512, 64))  # 2 scale groups of 16384 values
    assert four.splits(weight(256, 256)) and not two.splits(weight(1, 32768))
    assert two.splits(torch.nn.Parameter(torch.randn(3, 5)))  # plain weights: FSDP2 pads the last slice
    int8 = torch.nn.Sequential(torch.nn.Linear(64, 512))
    quantize_(int8, Int8WeightOnlyConfig())
    assert not two.splits(int8[0].weight)  # no FSDP2 all-gather extension
    whole = weight(512, 64)
    halves = torch.chunk(whole.data, 2)
    assert torch.equal(torch.cat([h.get_original_weight() for h in halves]), whole.get_original_weight())


def test_the_backward_of_an_nf4_linear_keeps_the_4bit_weight_and_computes_the_dequantized_gradient():
    from torchao.quantization import quantize_

    from lora_trainer.quantization import dequantized, keep_quantized_for_backward, nf4_config_type

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 512))
    layer.requires_grad_(False)
    quantize_(layer, nf4_config_type()())
    keep_quantized_for_backward(layer)
    full = dequantized(layer[0].weight)
    x = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert not any(type(t) is torch.Tensor and t.shape == full.shape for t in saved)  # no full-precision copy
    out.square().sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(reference, full, layer[0].bias).square().sum().backward()
    assert torch.allclose(x.grad, reference.grad, atol=1e-5)


def test_fsdp_moves_the_weights_it_does_not_shard_in_place_quantized_ones_included():
    """distributed.move: the LoRA weights and the quantized weights kept whole go to the device after sharding,
    as the same Parameter objects (the optimizer and peft hold them). The meta device stands in for a GPU."""
    from torchao.quantization import NF4Tensor, to_nf4

    from lora_trainer.distributed import move

    meta = torch.device("meta")
    plain = torch.nn.Parameter(torch.randn(4, 4))
    nf4 = torch.nn.Parameter(to_nf4(torch.randn(512, 64)), requires_grad=False)
    for param in (plain, nf4):
        before = id(param)
        move(param, meta)
        assert param.device == meta and id(param) == before
    assert isinstance(nf4.data, NF4Tensor) and plain.requires_grad and not nf4.requires_grad
