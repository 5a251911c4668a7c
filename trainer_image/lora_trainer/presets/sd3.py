"""Stable Diffusion 3 preset: a tiny MMDiT with two CLIP encoders (projected, pooled) and T5, SD3's VAE factors
and its static-shift scheduler."""

from __future__ import annotations

from pathlib import Path

from .flux import WIDTH, flow_scheduler, tiny_t5
from .sd import tiny_clip_text_config
from .tokenizers import write_tiny_clip_tokenizer, write_tiny_t5_tokenizer

CLIP_WIDTH = WIDTH // 2  # the two CLIPs' states side by side fill T5's width, as 768 + 1280 pad to 4096


def sd3_vae():
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
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_sd3(folder: Path) -> None:
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Tokenizer

    torch.manual_seed(0)
    clip_vocab = write_tiny_clip_tokenizer(folder / "tokenizer")
    write_tiny_clip_tokenizer(folder / "tokenizer_2", pad_token="!")  # as SD3's OpenCLIP tokenizer pads
    t5_vocab = write_tiny_t5_tokenizer(folder / "tokenizer_3")

    def clip():
        return CLIPTextModelWithProjection(
            tiny_clip_text_config(clip_vocab, hidden_size=CLIP_WIDTH, intermediate_size=32, projection_dim=WIDTH)
        )

    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=WIDTH,
        caption_projection_dim=WIDTH,
        pooled_projection_dim=2 * WIDTH,
        pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(shift=3.0),
        vae=sd3_vae(),
        text_encoder=clip(),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=clip(),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_3=tiny_t5(t5_vocab),
        tokenizer_3=T5Tokenizer.from_pretrained(folder / "tokenizer_3"),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
