"""Tiny model presets built locally from configs: `base_model: preset:tiny-sd` or `preset:tiny-llm`.

No model hub is needed: each preset is built once with a fixed seed into a cache folder, in the same
layout as a real model on disk (a diffusers or transformers folder), and then loaded through exactly the
same code path as a real model. Architectures match the real ones (SD 1.x UNet/VAE/CLIP, Llama) at
widths of 32-64, so everything but the size is exercised.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

PRESET_PREFIX = "preset:"
PRESET_VERSION = "2"  # bump when a builder changes, so caches rebuild


def cache_root() -> Path:
    return Path(os.environ.get("LORA_CACHE_DIR", Path.home() / ".cache" / "lora-operator"))


def is_preset(name: str) -> bool:
    return name.startswith(PRESET_PREFIX)


def preset_path(name: str) -> Path:
    """The local folder of a preset, built on first use. `name` is 'preset:<id>'."""
    preset_id = name[len(PRESET_PREFIX) :]
    builders = preset_builders()
    if preset_id not in builders:
        from .errors import ModelError

        raise ModelError(f"unknown preset {name!r}; available: {', '.join(PRESET_PREFIX + p for p in builders)}")
    target = cache_root() / "presets" / f"{preset_id}-v{PRESET_VERSION}"
    if not (target / ".complete").exists():
        _build_atomically(builders[preset_id], target)
    return target


def preset_builders() -> dict[str, Callable[[Path], None]]:
    from .labeling.presets import build_tiny_blip  # the captioner of lora-label and auto_label tests

    return {
        "tiny-sd": build_tiny_sd,
        "tiny-sdxl": build_tiny_sdxl,
        "tiny-llm": build_tiny_llm,
        "tiny-blip": build_tiny_blip,
        # real architectures with random weights, for benchmarks on a GPU (several GB on disk)
        "bench-sd15": build_bench_sd15,
        "bench-llama-1b": build_bench_llama_1b,
    }


def _build_atomically(build: Callable[[Path], None], target: Path) -> None:
    """Builds into a temp folder and renames it into place; a concurrent builder's result is kept.
    The builders seed torch for their random weights; fork_rng keeps that from reaching the caller, whose
    LoRA init would otherwise depend on whether the preset was already on disk."""
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            build(tmp)
        (tmp / ".complete").write_text(PRESET_VERSION)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except OSError:
        if not (target / ".complete").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def byte_unicode_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode alphabet: 256 printable characters, one per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> int:
    """A character-level CLIP BPE tokenizer (no merges); returns its vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_unicode_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
    )
    tokenizer.save_pretrained(folder)
    return len(tokens)


def tiny_clip_text_config(vocab_size: int, **overrides):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return CLIPTextConfig(**{**kwargs, **overrides})


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=64,
    )


def sd15_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def build_tiny_sd(folder: Path) -> None:
    """SD 1.x architecture: UNet with cross-attention, KL VAE (2x down), CLIP text encoder."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab_size = write_tiny_clip_tokenizer(folder / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_clip_text_config(vocab_size)),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), unet=unet,
        scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_tiny_sdxl(folder: Path) -> None:
    """SDXL architecture: two CLIP encoders (32 and 48 wide, the second with projection; of different widths,
    as in SDXL, which single-file loaders rely on) feeding an 80-wide cross-attention, and "text_time" added
    conditioning: pooled text (32) + six size/crop ids embedded at 8 = 80 inputs."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    vocab_size = write_tiny_clip_tokenizer(folder / "tokenizer")
    write_tiny_clip_tokenizer(folder / "tokenizer_2", pad_token="!")  # as SDXL's second tokenizer pads
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=80,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1, prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_clip_text_config(vocab_size)),
        text_encoder_2=CLIPTextModelWithProjection(
            tiny_clip_text_config(vocab_size, hidden_size=48, intermediate_size=96, projection_dim=32, hidden_act="gelu")),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_llm(folder: Path) -> None:
    """Llama architecture (GQA, RoPE, SwiGLU) with a byte-level BPE tokenizer and a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(byte_unicode_alphabet())}
    vocab.update({t: len(vocab) + i for i, t in enumerate(specials)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=specials[3:], model_max_length=1024,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)


def sd15_unet_config() -> dict:
    """Stable Diffusion 1.5's UNet (860M parameters)."""
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )


def sd15_vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )


def llama_1b_config(vocab_size: int) -> dict:
    """TinyLlama-1.1B's shape: 22 layers of 2048 with grouped-query attention."""
    return dict(
        vocab_size=vocab_size, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    )


def build_bench_sd15(folder: Path) -> None:
    """SD 1.5 architecture at full size with random weights (the CLIP ViT-L/14 text encoder too)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    write_tiny_clip_tokenizer(folder / "tokenizer")
    text_config = tiny_clip_text_config(49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**sd15_vae_config()), text_encoder=CLIPTextModel(text_config),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), unet=UNet2DConditionModel(**sd15_unet_config()),
        scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_bench_llama_1b(folder: Path) -> None:
    """A 1.1B Llama with random weights; the tiny byte-level tokenizer's ids fit its 32000-token vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tiny_llm(folder)  # tokenizer (and a tiny model, replaced below)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(**llama_1b_config(32000), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
