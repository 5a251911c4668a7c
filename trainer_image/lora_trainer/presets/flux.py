"""FLUX presets: a tiny FLUX.1-dev pipeline (double and single stream blocks, guidance input, CLIP + T5,
16-channel latents packed 2x2) with the real scheduler config."""

from __future__ import annotations

from pathlib import Path

from .sd import tiny_clip_text_config
from .tokenizers import write_tiny_clip_tokenizer, write_tiny_t5_tokenizer

WIDTH = 32  # every hidden size: transformer inner width, CLIP width (pooled), T5 width (sequence)


def flux_vae():
    """FLUX.1's VAE layout (16 latent channels, shift and scale factors) at two tiny levels: 2x down."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            is_encoder_decoder=False,
            use_cache=False,
        )
    )


def flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


FLUX1_DEV_SCHEDULER = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)


def build_tiny_flux1(folder: Path) -> None:
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Tokenizer

    torch.manual_seed(0)
    clip_vocab = write_tiny_clip_tokenizer(folder / "tokenizer")
    t5_vocab = write_tiny_t5_tokenizer(folder / "tokenizer_2")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=WIDTH,
        pooled_projection_dim=WIDTH,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,
    )
    pipe = FluxPipeline(
        scheduler=flow_scheduler(**FLUX1_DEV_SCHEDULER),
        vae=flux_vae(),
        text_encoder=CLIPTextModel(tiny_clip_text_config(clip_vocab, hidden_size=WIDTH)),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=tiny_t5(t5_vocab),
        tokenizer_2=T5Tokenizer.from_pretrained(folder / "tokenizer_2"),
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_bench_flux1(folder: Path) -> None:
    """FLUX.1-dev's transformer (11.9B parameters) and VAE at full size with random weights; the text
    encoders have FLUX's widths (CLIP-L 768, T5-XXL 4096) but one layer: the benchmarks embed prompts once."""
    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    clip_vocab = write_tiny_clip_tokenizer(folder / "tokenizer")
    t5_vocab = write_tiny_t5_tokenizer(folder / "tokenizer_2")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=1,
            num_heads=64,
            is_encoder_decoder=False,
            use_cache=False,
        )
    )
    torch.set_default_dtype(torch.bfloat16)  # 24 GB instead of 48 while building
    try:
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # the constructor's defaults are FLUX.1's
    finally:
        torch.set_default_dtype(torch.float32)
    pipe = FluxPipeline(
        scheduler=flow_scheduler(**FLUX1_DEV_SCHEDULER),
        vae=vae,
        text_encoder=CLIPTextModel(
            tiny_clip_text_config(
                clip_vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12
            )
        ),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=T5Tokenizer.from_pretrained(folder / "tokenizer_2"),
        transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
