"""Causal-LM LoRA with transformers + peft; the output folder also loads with PeftModel.from_pretrained.

The base may load quantized (quantization.py: QLoRA's nf4, int8, fp8), samples may be packed padding-free
(data/packing.py), and the loss may skip the full logits (lm_loss.py).
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from ..adapters import autocast, check_targets_exist, lora_param_groups
from ..base_model import load_or_explain, resolve_local_model
from ..compat import CompilerForTorchCompile, Need
from ..config import TrainConfig
from ..data.packing import Packed, Padded
from ..data.text import IGNORE_INDEX, collate_tokens, tokenize_dataset
from ..distributed import to_device_except
from ..errors import ConfigError, DatasetError, ModelError
from ..files import link_or_copy
from ..layout import PEFT_CONFIG, PEFT_WEIGHTS
from ..lm_loss import causal_lm_loss
from ..observers import ValidationResult
from ..quantization import QuantizedBase, frozen_weight_bytes, keep_quantized_for_backward, load_kwargs
from .base import DataReport

log = logging.getLogger("lora_trainer")


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    source = resolve_local_model(cfg)
    tokenizer = load_or_explain("the tokenizer", cfg.base_model, lambda: AutoTokenizer.from_pretrained(source))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.is_fast:
        raise ModelError(f"base_model {cfg.base_model}: a fast tokenizer is needed (offsets mark the trained tokens)")
    return tokenizer


DEFAULT_TARGETS = ("q_proj", "v_proj")  # peft's default for Llama-style attention, as in the peft examples


class TextGenerationTask:
    weights_format = "peft"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.model = None
        self.validation_examples: list = []

    @staticmethod
    def library_needs(cfg: TrainConfig) -> list[Need]:
        # peft wraps the model itself: no library in between declares a peft version
        needs: list[Need] = []
        if cfg.base_quantization != "none":
            needs.append(QuantizedBase(cfg.base_quantization, "transformers", cfg.device, cfg.distributed_strategy))
        if cfg.torch_compile:
            needs.append(CompilerForTorchCompile(cfg.device))
        return needs

    # -- data
    def prepare_data(self, labeling=None) -> DataReport:  # text is never captioned
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg)
        self.data = tokenize_dataset(cfg.train_data_dir, self.tokenizer, cfg.dataset_format, cfg.max_seq_length)
        lengths = self.data.lengths
        summary = {
            "records": self.data.records,
            "format": self.data.format,
            "examples": len(self.data.examples),
            "tokens_min": min(lengths),
            "tokens_median": int(statistics.median(lengths)),
            "tokens_max": max(lengths),
            "max_seq_length": cfg.max_seq_length,
            "truncated": self.data.truncated,
        }
        warnings = [r for r in [self.data.truncation_report(cfg.max_seq_length)] if r]
        warnings += self.hold_out_validation(summary)
        pad_id = self.tokenizer.pad_token_id
        examples = self.data.examples
        self.batching = Packed(examples, cfg.max_seq_length, pad_id) if cfg.packing else Padded(examples, pad_id)
        summary.update(self.batching.summary())
        return DataReport(summary=summary, warnings=warnings)

    def hold_out_validation(self, summary: dict) -> list[str]:
        """validation_data tokenized like the training data, or a seeded validation_split of it."""
        cfg = self.cfg
        if cfg.validation_data:
            held = tokenize_dataset(cfg.validation_data, self.tokenizer, cfg.dataset_format, cfg.max_seq_length)
            self.validation_examples = held.examples
            summary["validation_examples"] = len(held.examples)
            report = held.truncation_report(cfg.max_seq_length)
            return [f"validation data: {report}"] if report else []
        if cfg.validation_split:
            examples = self.data.examples
            count = max(1, round(len(examples) * cfg.validation_split))
            if count >= len(examples):
                raise DatasetError(
                    f"validation_split={cfg.validation_split} leaves no training example out of {len(examples)}"
                )
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            self.validation_examples = [examples[i] for i in order[:count]]
            self.data.examples = [examples[i] for i in sorted(order[count:])]
            summary.update(examples=len(self.data.examples), validation_examples=count)
        return []

    def dataset(self) -> torch.utils.data.Dataset:
        return self.batching.dataset()

    def item_groups(self) -> tuple[tuple[int, ...], ...]:
        return (tuple(range(len(self.batching))),)

    def collate(self, items):
        return self.batching.collate(items)

    # -- model
    def load(self, device: torch.device, weight_dtype: torch.dtype, blocks_on_host: bool = False) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        source = resolve_local_model(cfg)
        quantized = load_kwargs(cfg.base_quantization, "transformers", weight_dtype, cfg.distributed_strategy)
        # quantized as it loads, on the device (or in host memory, blocks_on_host: fsdp moves each shard)
        placed = {"device_map": {"": str(device)}} if quantized and not blocks_on_host else {}
        model = load_or_explain(
            "the causal LM",
            cfg.base_model,
            lambda: AutoModelForCausalLM.from_pretrained(
                source, dtype=weight_dtype, attn_implementation="sdpa", **quantized, **placed
            ),
        )
        check_targets_exist(model, self.targets, "model", rank=cfg.lora_rank)
        keep_quantized_for_backward(model)
        if cfg.chunked_cross_entropy:
            check_plain_logits(model.config)
        # peft's prepare_model_for_kbit_training is not called on a quantized base: its fp32 copy of every
        # unquantized weight (embeddings, output layer) would double their memory; what else it does (frozen
        # base, fp32 LoRA weights, checkpointing without re-entrance) happens here for every base alike
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.lora_rank,
            lora_alpha=cfg.network_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=self.targets,
        )
        model = get_peft_model(model, lora)
        model.peft_config["default"].base_model_name_or_path = cfg.base_model
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.model, self.device = model, device
        to_device_except(model, device, self.frozen_blocks() if blocks_on_host else ())
        if quantized:
            log.info("frozen base weights (%s): %.1f MiB", cfg.base_quantization, frozen_weight_bytes(model) / 2**20)
        if cfg.torch_compile:
            self.causal_lm.get_decoder().compile()  # the decoder, LoRA included; the loss stays eager

    @property
    def causal_lm(self) -> torch.nn.Module:
        """The transformers model inside peft's wrapper, its LoRA layers in place."""
        return self.model.get_base_model()

    def param_groups(self) -> list[dict[str, Any]]:
        return lora_param_groups([(self.model, self.cfg.learning_rate)])

    def frozen_blocks(self) -> list[torch.nn.Module]:
        """The decoder layers (their LoRA inside); embeddings, final norm and output layer stay whole."""
        return list(self.causal_lm.get_decoder().layers)

    def train_mode(self) -> None:
        self.model.train()

    # -- one micro-batch
    def loss(self, batch: dict[str, torch.Tensor], draws=None) -> torch.Tensor:
        """The mean loss over the batch's trained tokens. use_cache=False also lets transformers read restarting
        position_ids as packed samples (it does not with a cache)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with autocast(self.device, self.cfg.mixed_precision):
            if not self.cfg.chunked_cross_entropy:
                return self.model(**batch, use_cache=False).loss
            labels = batch.pop("labels")
            hidden = self.causal_lm.get_decoder()(**batch, use_cache=False).last_hidden_state  # (B, T, H)
            return causal_lm_loss(hidden, self.causal_lm.get_output_embeddings(), labels)

    def item_weights(self) -> list[float]:
        """The tokens each item (a sample, or a packed row) trains: the causal LM's loss is their mean."""
        return self.batching.item_weights()

    def batch_counts(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        return self.batching.samples(batch), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    # -- validation
    def validate(self, step: int) -> ValidationResult | None:
        """Mean loss per trained token over the held-out examples."""
        if not self.validation_examples:
            return None
        self.model.eval()
        collate, size = collate_tokens(self.tokenizer.pad_token_id), self.cfg.batch_size
        total, tokens = 0.0, 0
        for start in range(0, len(self.validation_examples), size):
            batch = collate(self.validation_examples[start : start + size])
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the model shifts labels by one
            with torch.no_grad():
                total += float(self.loss(batch, None)) * n
            tokens += n
        return ValidationResult(step, loss=total / max(tokens, 1))

    # -- weights
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.model, save_embedding_layers=False)
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        if getattr(result, "unexpected_keys", []):
            raise ModelError(f"checkpoint does not match the model's LoRA: {result.unexpected_keys[:3]}")

    @property
    def targets(self) -> list[str]:
        return list(self.cfg.target_modules or DEFAULT_TARGETS)

    def weights_metadata(self) -> dict[str, str]:
        return {"target_modules": ",".join(self.targets)}

    def final_files(
        self, out: Path, final_checkpoint: Path, weights: dict[str, torch.Tensor], meta: dict[str, str]
    ) -> list[tuple[Path, str]]:
        """adapter_config.json and adapter_model.safetensors (a link to the final checkpoint), so
        PeftModel.from_pretrained(model, output_dir) loads the final weights."""
        self.model.peft_config["default"].save_pretrained(out)
        return [(out / PEFT_CONFIG, "config"), (link_or_copy(final_checkpoint, out / PEFT_WEIGHTS), "peft")]


def check_plain_logits(config) -> None:
    """chunked_cross_entropy applies the output layer alone: models that scale or cap its logits are refused."""
    changes = [k for k in ("final_logit_softcapping", "logit_scale") if getattr(config, k, None) not in (None, 1.0)]
    if changes:
        raise ConfigError(
            f"chunked_cross_entropy: {config.model_type} changes its logits after the output layer "
            f"({', '.join(changes)}); train it with chunked_cross_entropy: false"
        )
