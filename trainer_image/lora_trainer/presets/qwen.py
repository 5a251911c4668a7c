"""Presets of the families with Qwen text models: Qwen-Image (Qwen2.5-VL), Z-Image (Qwen3) and FLUX.2 [klein]
(Qwen3 with its three stacked layers), tiny, with the real architecture classes and scheduler configs."""

from __future__ import annotations

from pathlib import Path

from .flux import flow_scheduler, flux_vae
from .tokenizers import write_tiny_qwen_tokenizer

TEXT_WIDTH = 16


def qwen3_config(vocab_size: int, layers: int = 2):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )


def build_tiny_qwen_image(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    torch.manual_seed(0)
    vocab = write_tiny_qwen_tokenizer(folder / "tokenizer")
    vision_ids = dict(
        vision_start_token_id=vocab,
        vision_end_token_id=vocab + 1,
        image_token_id=vocab + 2,
        video_token_id=vocab + 3,
        vision_token_id=vocab + 4,
    )  # past the text vocabulary: never used
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "hidden_size": TEXT_WIDTH,
                "intermediate_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "vocab_size": vocab + 8,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 16,
            },
            vocab_size=vocab + 8,
            **vision_ids,
        )
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    )
    scheduler = flow_scheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )
    QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=Qwen2Tokenizer.from_pretrained(folder / "tokenizer"),
        transformer=transformer,
    ).save_pretrained(folder, safe_serialization=True)


def build_tiny_z_image(folder: Path) -> None:
    import torch
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Model

    torch.manual_seed(0)
    vocab = write_tiny_qwen_tokenizer(folder / "tokenizer")
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=TEXT_WIDTH,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # created with torch.empty: give the padding tokens values, as diffusers' tests do
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    ZImagePipeline(
        scheduler=flow_scheduler(shift=3.0),
        vae=flux_vae(),
        text_encoder=Qwen3Model(qwen3_config(vocab)),
        tokenizer=Qwen2Tokenizer.from_pretrained(folder / "tokenizer"),
        transformer=transformer,
    ).save_pretrained(folder, safe_serialization=True)


def build_tiny_flux2_klein(folder: Path) -> None:
    """FLUX.2 [klein]: its pipeline stacks Qwen3 layers 9, 18 and 27, so the tiny Qwen3 has 28 of them."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

    torch.manual_seed(0)
    vocab = write_tiny_qwen_tokenizer(folder / "tokenizer")
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():  # batch-norm statistics that are not the identity, as a trained VAE's
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.2)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    scheduler = flow_scheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=Qwen3ForCausalLM(qwen3_config(vocab, layers=28)),
        tokenizer=Qwen2Tokenizer.from_pretrained(folder / "tokenizer"),
        transformer=transformer,
        is_distilled=False,
    ).save_pretrained(folder, safe_serialization=True)
