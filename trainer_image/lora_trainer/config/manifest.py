"""LoRATrainingJob spec <-> flat trainer config: one table, so a manifest runs locally and on the cluster.

The operator builds the trainer's ConfigMap with `config_from_spec`; `lora-train --config job.yaml`
uses the same function, so both read a manifest the same way. Pure functions, PyYAML-free.
"""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import ConfigError

API_VERSION = "lora-operator.io/v1alpha1"
KIND = "LoRATrainingJob"

# (path in spec, trainer config key). Every trainer-relevant spec field is listed here.
SPEC_TO_CONFIG: tuple[tuple[tuple[str, ...], str], ...] = (
    (("task",), "task_type"),
    (("baseModel",), "base_model"),
    (("modelFamily",), "model_family"),
    (("baseModelConfig",), "base_model_config"),
    (("description",), "description"),
    (("dataset", "uri"), "train_data_dir"),
    (("dataset", "metadataPath"), "metadata_path"),
    (("dataset", "captionExtension"), "caption_extension"),
    (("dataset", "format"), "dataset_format"),
    (("dataset", "resolution"), "resolution"),
    (("dataset", "centerCrop"), "center_crop"),
    (("dataset", "randomFlip"), "random_flip"),
    (("dataset", "maxSeqLength"), "max_seq_length"),
    (("dataset", "packing"), "packing"),
    (("dataset", "autoLabel"), "auto_label"),
    (("dataset", "labelModel"), "label_model"),
    (("dataset", "captionPrefix"), "caption_prefix"),
    (("dataset", "captionSuffix"), "caption_suffix"),
    (("dataset", "bucketing", "enabled"), "enable_bucket"),
    (("dataset", "bucketing", "minResolution"), "min_bucket_reso"),
    (("dataset", "bucketing", "maxResolution"), "max_bucket_reso"),
    (("dataset", "bucketing", "step"), "bucket_reso_steps"),
    (("training", "rank"), "lora_rank"),
    (("training", "alpha"), "network_alpha"),
    (("training", "dropout"), "lora_dropout"),
    (("training", "targetModules"), "target_modules"),
    (("training", "trainTextEncoder"), "train_text_encoder"),
    (("training", "textEncoderLearningRate"), "text_encoder_lr"),
    (("training", "batchSize"), "batch_size"),
    (("training", "gradientAccumulationSteps"), "gradient_accumulation_steps"),
    (("training", "epochs"), "epochs"),
    (("training", "steps"), "max_train_steps"),
    (("training", "learningRate"), "learning_rate"),
    (("training", "lrScheduler"), "lr_scheduler"),
    (("training", "warmupSteps"), "lr_warmup_steps"),
    (("training", "weightDecay"), "adam_weight_decay"),
    (("training", "maxGradNorm"), "max_grad_norm"),
    (("training", "precision"), "mixed_precision"),
    (("training", "gradientCheckpointing"), "gradient_checkpointing"),
    (("training", "baseQuantization"), "base_quantization"),
    (("training", "quantizeTextEncoders"), "quantize_text_encoders"),
    (("training", "chunkedCrossEntropy"), "chunked_cross_entropy"),
    (("training", "torchCompile"), "torch_compile"),
    (("training", "distributedStrategy"), "distributed_strategy"),
    (("training", "seed"), "seed"),
    (("training", "snrGamma"), "snr_gamma"),
    (("training", "noiseOffset"), "noise_offset"),
    (("training", "predictionType"), "prediction_type"),
    (("training", "cacheLatents"), "cache_latents"),
    (("training", "cacheTextEncoderOutputs"), "cache_text_encoder_outputs"),
    (("training", "flowMatching", "weightingScheme"), "weighting_scheme"),
    (("training", "flowMatching", "logitMean"), "logit_mean"),
    (("training", "flowMatching", "logitStd"), "logit_std"),
    (("training", "flowMatching", "modeScale"), "mode_scale"),
    (("training", "flowMatching", "timestepShift"), "timestep_shift"),
    (("training", "flowMatching", "resolutionShift"), "resolution_shift"),
    (("training", "flowMatching", "guidanceScale"), "guidance_scale"),
    (("training", "flowMatching", "maxSequenceLength"), "max_sequence_length"),
    (("validation", "prompts"), "validation_prompts"),
    (("validation", "steps"), "validation_steps"),
    (("validation", "seed"), "validation_seed"),
    (("validation", "inferenceSteps"), "validation_inference_steps"),
    (("validation", "guidanceScale"), "validation_guidance_scale"),
    (("validation", "dataUri"), "validation_data"),
    (("validation", "split"), "validation_split"),
    (("output", "uri"), "output_dir"),
    (("output", "name"), "output_name"),
    (("output", "saveSteps"), "save_steps"),
    (("output", "keepCheckpoints"), "keep_checkpoints"),
    (("output", "formats"), "save_formats"),
    (("output", "overwrite"), "overwrite"),
)


def is_manifest(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == KIND


def config_from_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The flat trainer config (canonical keys) that a LoRATrainingJob spec describes."""
    config: dict[str, Any] = {}
    for path, key in SPEC_TO_CONFIG:
        value = _lookup(spec, path)
        if value is not None:
            config[key] = value
    return config


def config_from_manifest(doc: dict[str, Any], source: str = "manifest") -> dict[str, Any]:
    if doc.get("apiVersion") != API_VERSION:
        raise ConfigError(f"{source}: apiVersion must be {API_VERSION}, got {doc.get('apiVersion')!r}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: a {KIND} needs a 'spec' mapping")
    unknown = _unmapped_leaves(spec)
    if unknown:
        known = ", ".join(".".join(p) for p, _ in SPEC_TO_CONFIG[:6])
        named = ", ".join(_with_hint(field) for field in unknown)
        raise ConfigError(f"{source}: unknown spec field(s) {named} (known fields include {known}, ...)")
    return config_from_spec(spec)


# Spec sections that configure the cluster, not the trainer; lora-train ignores them when run locally.
CLUSTER_ONLY_FIELDS = frozenset(
    {
        "resources",
        "image",
        "s3",
        "backoffLimit",
        "activeDeadlineSeconds",
        "suspend",
        "ttlSecondsAfterFinished",
        "cleanupPolicy",
    }
)


def _unmapped_leaves(spec: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[str]:
    """Spec fields that map to nothing, at any depth (a typo must not be silently ignored)."""
    mapped = {path for path, _ in SPEC_TO_CONFIG}
    sections = {path[:i] for path in mapped for i in range(1, len(path))}
    unknown = []
    for key, value in spec.items():
        path = (*prefix, key)
        if (not prefix and key in CLUSTER_ONLY_FIELDS) or path in mapped:
            continue
        if path in sections and isinstance(value, dict):
            unknown += _unmapped_leaves(value, path)
        else:
            unknown.append("spec." + ".".join(path))
    return unknown


def _with_hint(field: str) -> str:
    """spec.training.learningRat -> '... (did you mean spec.training.learningRate?)'."""
    known = ["spec." + ".".join(path) for path, _ in SPEC_TO_CONFIG]
    close = difflib.get_close_matches(field, known, n=1, cutoff=0.8)
    return f"{field} (did you mean {close[0]}?)" if close else field


def _lookup(spec: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = spec
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node
