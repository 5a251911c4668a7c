"""What the text-to-image task needs from a model family, and what families share.

A family knows its pipeline on disk (which classes, which text encoders), how a caption becomes
conditioning, how an image becomes latents, the training objective, which modules get LoRA by default,
how its LoRA files are spelled, and how it samples images. The task (tasks/text_to_image.py) owns the
data, the caches and the loop interface and never asks which family runs.

Conditioning crosses the task/family boundary as plain dicts of tensors: `encode_prompts` gives one entry
per caption (what the text-encoder cache stores), `collate_prompts` makes a batch of them.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..base_model import config_source, load_or_explain, resolve_local_model
from ..config import TrainConfig
from ..distributed import BatchRandom, to_device_except
from ..errors import ConfigError, ModelError
from ..quantization import keep_quantized_for_backward, load_kwargs

log = logging.getLogger("lora_trainer")

Conditioning = dict[str, torch.Tensor]


@dataclass
class Components:
    """The loaded parts of a pipeline. `denoiser` is the UNet or transformer, the module that gets LoRA."""

    tokenizers: list[Any]
    text_encoders: list[torch.nn.Module] = field(default_factory=list)
    denoiser: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    scheduler: Any = None


def read_model_index(cfg: TrainConfig) -> dict[str, Any]:
    """model_index.json of the model's folder or hub id (for a single file: of base_model_config)."""
    from diffusers import DiffusionPipeline

    source = config_source(cfg)
    return dict(load_or_explain("model_index.json", cfg.base_model, lambda: DiffusionPipeline.load_config(source)))


def sample_posterior(dist, draws: BatchRandom) -> torch.Tensor:
    """A sample of the VAE's latent distribution, as DiagonalGaussianDistribution.sample draws it."""
    return dist.mean + dist.std * draws.randn(tuple(dist.mean.shape[1:]), dtype=dist.parameters.dtype).to(
        dist.mean.device
    )


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


class ModelFamily:
    """Base of the families; subclasses set the class attributes and implement the abstract hooks."""

    name: ClassVar[str]  # the model_family value: "sd", "sdxl", "flux1", ...
    denoiser_prefix: ClassVar[str] = "transformer"  # the component name in LoRA files and pipelines
    denoiser_class: ClassVar[str]  # diffusers class of the denoiser (single-file loading)
    text_encoder_subfolders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_subfolders: ClassVar[tuple[str, ...]] = ("tokenizer",)
    default_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    caches_prompts: ClassVar[bool] = True  # default of cache_text_encoder_outputs (big frozen encoders)
    releases_text_encoders: ClassVar[bool] = True  # free them once every caption is embedded
    checkpoints_gradients: ClassVar[bool] = True  # default of gradient_checkpointing
    text_encoder_lora: ClassVar[bool] = False  # whether train_text_encoder is supported
    default_guidance: ClassVar[float] = 7.5  # of validation images, where validation_guidance_scale is unset
    # the denoiser's attributes that hold its blocks (a ModuleList, or one block): the units that
    # distributed_strategy fsdp shards; together they hold nearly all of the denoiser's weights
    block_attributes: ClassVar[tuple[str, ...]] = ("transformer_blocks", "single_transformer_blocks")

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.source = resolve_local_model(cfg)  # the model folder, or a single .safetensors file
        self.config_source = config_source(cfg)  # the folder holding the pipeline's configs
        self.parts = Components(tokenizers=[])
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._pipeline = None
        self._dtypes: dict[torch.nn.Module, torch.dtype] = {}

    # -- settings that default per family
    @property
    def targets(self) -> list[str]:
        return list(self.cfg.target_modules or self.default_targets)

    @property
    def cache_prompts(self) -> bool:
        chosen = self.cfg.cache_text_encoder_outputs
        return self.caches_prompts if chosen is None else chosen

    @property
    def gradient_checkpointing(self) -> bool:
        chosen = self.cfg.gradient_checkpointing
        return self.checkpoints_gradients if chosen is None else chosen

    def check_config(self) -> None:
        """Refuses settings this family cannot honour, before any weight loads."""
        if self.cfg.train_text_encoder and not self.text_encoder_lora:
            raise ConfigError(
                f"train_text_encoder is not supported for {self.name}: its text encoders stay frozen "
                "(their outputs are cached by default)"
            )

    def summary(self) -> dict[str, Any]:
        """What EXPERIMENT.md and the logs should know about the family's resolved settings."""
        return {
            "model_family": self.name,
            "target_modules": ",".join(self.targets),
            "cached_prompt_embeddings": self.cache_prompts,
            "gradient_checkpointing": self.gradient_checkpointing,
        }

    # -- loading
    def load_tokenizers(self) -> list[Any]:
        """The tokenizers (cheap: before any weight loads, to check captions)."""
        self.parts.tokenizers = [self._load_part(sub) for sub in self.tokenizer_subfolders]
        return self.parts.tokenizers

    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        quantized = self.text_encoder_quantization(dtype)
        encoders = [self._load_part(sub, torch_dtype=dtype, **quantized) for sub in self.text_encoder_subfolders]
        for encoder in encoders:
            encoder.requires_grad_(False)
            encoder.to(device)
            encoder.eval()
        self.parts.text_encoders = encoders

    def text_encoder_quantization(self, dtype: torch.dtype) -> dict[str, Any]:
        """from_pretrained's arguments that quantize the text encoders (quantize_text_encoders), else {}."""
        if not self.cfg.quantize_text_encoders:
            return {}
        return load_kwargs(self.cfg.base_quantization, "transformers", dtype, self.cfg.distributed_strategy)

    def release_text_encoders(self) -> None:
        """Frees the text encoders once every caption is embedded (they are the largest frozen part)."""
        self.parts.text_encoders = []
        self._pipeline = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def load_denoiser_and_vae(self, device: torch.device, dtype: torch.dtype, blocks_on_host: bool = False) -> None:
        """The denoiser (its denoiser_blocks() left in host memory with blocks_on_host: Task.load), VAE, scheduler."""
        import diffusers

        self.device, self.dtype = device, dtype
        cfg = self.cfg  # base_quantization: the denoiser only, it is the bulk
        quantized = load_kwargs(cfg.base_quantization, "diffusers", dtype, cfg.distributed_strategy)
        if Path(self.source).is_file():  # a single-file transformer, the rest of the pipeline from its configs
            cls = getattr(diffusers, self.denoiser_class)
            denoiser = load_or_explain(
                "the single-file transformer",
                self.cfg.base_model,
                lambda: cls.from_single_file(
                    self.source,
                    config=self.config_source,
                    subfolder=self.denoiser_prefix,
                    torch_dtype=dtype,
                    local_files_only=True,
                    **quantized,
                ),
            )
        else:
            denoiser = self._load_part(self.denoiser_prefix, torch_dtype=dtype, **quantized)
        vae = self._load_part("vae", torch_dtype=dtype)
        scheduler = self._load_part("scheduler")
        self.parts.denoiser, self.parts.vae, self.parts.scheduler = denoiser, vae, scheduler
        for module in (denoiser, vae):
            module.requires_grad_(False)
            to_device_except(module, device, self.denoiser_blocks() if blocks_on_host and module is denoiser else ())
        vae.eval()
        keep_quantized_for_backward(denoiser)
        self.after_load()

    def dtype_of(self, module: torch.nn.Module) -> torch.dtype:
        """A loaded model's compute dtype, read once: diffusers' `.dtype` walks every submodule (milliseconds
        on a large model, and a step asks several times)."""
        if module not in self._dtypes:
            self._dtypes[module] = module.dtype
        return self._dtypes[module]

    def after_load(self) -> None:
        """Family checks and derived state once the denoiser and VAE are loaded."""

    def size_multiple(self) -> tuple[int, str]:
        """Training sizes must be multiples of this (and why): the VAE's downscale factor times the latent patch."""
        return 2 * vae_scale_factor(self.parts.vae), "the VAE's downscale factor times the 2x2 latent patches"

    def _load_part(self, subfolder: str, **kwargs):
        """One component of the pipeline, with the class model_index.json names for it."""
        import importlib

        library, class_name = self.model_index()[subfolder]
        cls = getattr(importlib.import_module(library), class_name)
        return load_or_explain(
            subfolder,
            self.cfg.base_model,
            lambda: cls.from_pretrained(self.config_source, subfolder=subfolder, **kwargs),
        )

    def model_index(self) -> dict[str, Any]:
        return read_model_index(self.cfg)

    # -- LoRA
    def add_lora(self) -> None:
        from peft import LoraConfig

        from ..adapters import check_targets_exist

        denoiser = self.parts.denoiser
        check_targets_exist(denoiser, self.targets, f"{self.name} {self.denoiser_prefix}", rank=self.cfg.lora_rank)
        cfg = self.cfg
        denoiser.add_adapter(
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.network_alpha,
                lora_dropout=cfg.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=self.targets,
            )
        )
        for p in denoiser.parameters():  # LoRA weights train in fp32 whatever the base dtype
            if p.requires_grad:
                p.data = p.data.float()
        if self.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()

    def param_groups(self) -> list[tuple[torch.nn.Module, float]]:
        """(module, learning rate) of the modules whose LoRA weights train."""
        return [(self.parts.denoiser, self.cfg.learning_rate)]

    def denoiser_blocks(self) -> list[torch.nn.Module]:
        """The denoiser's blocks, in order (block_attributes; those the model lacks are skipped)."""
        blocks: list[torch.nn.Module] = []
        for name in self.block_attributes:
            found = getattr(self.parts.denoiser, name, None)
            if isinstance(found, torch.nn.ModuleList):
                blocks.extend(found)
            elif isinstance(found, torch.nn.Module):
                blocks.append(found)
        return blocks

    def trainable_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """(prefix in LoRA files, module) of everything that carries trained LoRA weights."""
        return [(self.denoiser_prefix, self.parts.denoiser)]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """'transformer.<module>.lora_A.weight' keys, as diffusers' save_lora_weights writes them."""
        from peft.utils import get_peft_model_state_dict

        out = {}
        for prefix, module in self.trainable_modules():
            state = get_peft_model_state_dict(module, save_embedding_layers=False)
            out.update({f"{prefix}.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()})
        return out

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        for prefix, module in self.trainable_modules():
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if not part:
                raise ModelError(f"checkpoint has no {prefix} LoRA weights")
            result = set_peft_model_state_dict(module, part)
            if getattr(result, "unexpected_keys", []):
                raise ModelError(
                    f"checkpoint does not match the {prefix} LoRA (unexpected: {result.unexpected_keys[:3]})"
                )

    def adapter_metadata(self) -> dict[str, Any]:
        """LoraConfig kwargs under '<prefix>.', as diffusers' load_lora_weights reads them back."""
        from ..formats.lora import diffusers_lora_metadata

        cfg = self.cfg
        return diffusers_lora_metadata(self.denoiser_prefix, cfg.lora_rank, cfg.network_alpha, self.targets)

    # -- conditioning (families implement encode_prompts)
    def token_inputs(self, captions: list[str]) -> list[dict[str, torch.Tensor]] | None:
        """Per caption, the token ids the dataset serves when prompts are encoded during training; None when the
        family encodes from the caption text (its pipeline's own encode_prompt)."""
        return None

    def prompt_batch(self, captions: list[str]) -> dict[str, Any]:
        """What encode_prompts takes for these captions."""
        return {"caption": list(captions)}

    def prompt_cache_version(self) -> str:
        """Part of every text-cache key: entries of another family or layout are never served."""
        return self.name

    def caption_limit(self) -> tuple[Any, int]:
        """(tokenizer, longest prompt in tokens) of the encoder whose truncation a caption can run into."""
        tokenizer = self.parts.tokenizers[-1]
        return tokenizer, self.max_sequence_length()

    def max_sequence_length(self) -> int:
        return self.cfg.max_sequence_length or self.default_sequence_length

    default_sequence_length: ClassVar[int] = 512

    def encode_prompts(self, batch: dict[str, Any]) -> Conditioning:
        """Batched conditioning from the batch's token ids or its 'caption' strings."""
        raise NotImplementedError

    def split_prompts(self, cond: Conditioning, count: int) -> list[Conditioning]:
        """Per-caption entries of a batched conditioning, for the cache; rows of every tensor by default."""
        return [{k: v[i] for k, v in cond.items()} for i in range(count)]

    def collate_prompts(self, entries: list[Conditioning]) -> Conditioning:
        return {k: torch.stack([e[k] for e in entries]) for k in entries[0]}

    # -- latents
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent distribution parameters (mean and log-variance), what the latent cache stores."""
        vae = self.parts.vae
        return vae.encode(pixels.to(self.device, self.dtype_of(vae))).latent_dist.parameters

    def latents(self, params: torch.Tensor, draws: BatchRandom) -> torch.Tensor:
        """Normalized latents from the distribution parameters: sampled with the run's generator by default."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return sample_posterior(DiagonalGaussianDistribution(params.to(self.device)), draws).float()

    # -- training
    def loss(
        self, latents: torch.Tensor, cond: Conditioning, batch: dict[str, Any], draws: BatchRandom
    ) -> torch.Tensor:
        raise NotImplementedError

    def train_mode(self) -> None:
        self.parts.denoiser.train()
        for encoder in self.parts.text_encoders:
            encoder.eval()

    def eval_mode(self) -> None:
        self.parts.denoiser.eval()
        for encoder in self.parts.text_encoders:
            encoder.eval()

    # -- outputs
    def weights_metadata(self) -> dict[str, str]:
        return {
            "lora_adapter_metadata": json.dumps(self.adapter_metadata(), sort_keys=True),
            "model_family": self.name,
            "target_modules": ",".join(self.targets),
        }

    def extra_files(self, out: Path, weights: dict[str, torch.Tensor], meta: dict[str, str]) -> list[tuple[Path, str]]:
        """The family's kohya/ComfyUI file beside the main one, as (path, format): the transformer's LoRAs in
        the original checkpoint's layout (formats/native.py)."""
        from ..formats.native import write_native_file

        layout = self.native_layout(self.parts.denoiser)
        return write_native_file(self.cfg, out, weights, meta, layout, self.kohya_metadata())

    @staticmethod
    def native_layout(denoiser: torch.nn.Module):
        """The original checkpoint's module names of the denoiser (formats/native.py NativeLayout)."""
        raise NotImplementedError

    def kohya_metadata(self) -> dict[str, str]:
        """The ss_*/modelspec.* keys kohya-style trainers write for this family."""
        return {}

    # -- sampling
    def prepare_sampling(self, prompts: list[str]) -> None:
        """Called while the text encoders are loaded: what sampling these prompts later needs."""

    def sample(
        self, prompt: str, generator: torch.Generator, width: int, height: int, steps: int, guidance: float | None
    ) -> Any:
        """One validation image (PIL) for a prompt, with the modules being trained."""
        raise NotImplementedError

    def guidance(self, chosen: float | None) -> float:
        return self.default_guidance if chosen is None else chosen
