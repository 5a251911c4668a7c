"""The trainer config: one flat set of keys, compatible with lora-scripts configs.

Every key is a field of `TrainConfig` declared with `option(...)`: its default, a one-line doc, its
aliases (the names other trainers use) and its constraints. Validation (validate.py) and the generated
reference (docs/config.md) read these declarations, so a key is described in exactly one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

TASKS = ("text-to-image", "text-generation")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
DATASET_FORMATS = ("auto", "text", "prompt_completion", "chat")
DEVICES = ("auto", "cpu", "cuda")
SAVE_FORMATS = ("diffusers", "kohya")
MODEL_FAMILIES = ("auto", "sd", "sdxl", "flux1", "flux2", "sd3", "qwen-image", "z-image")  # lora_trainer/families
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")  # diffusers.training_utils' names
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp")  # lora_trainer/distributed.py: STRATEGIES
QUANTIZATION_MODES = ("none", "int8", "fp8", "nf4")  # lora_trainer/quantization.py: one backend each
T2I, LLM = ("text-to-image",), ("text-generation",)  # the task(s) a key applies to
REQUIRED = dataclasses.MISSING


def option(
    default: Any = None,
    doc: str = "",
    *,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    min: float | None = None,  # noqa: A002 - reads naturally at the call sites
    max: float | None = None,  # noqa: A002
    min_exclusive: bool = False,
    group: str = "general",
    comma_list: bool = True,
    tasks: tuple[str, ...] | None = None,
) -> Any:
    """Declares one config key with its documentation and constraints."""
    metadata = {
        "doc": doc,
        "aliases": aliases,
        "choices": choices,
        "min": min,
        "max": max,
        "min_exclusive": min_exclusive,
        "group": group,
        "comma_list": comma_list,  # lists may be written "a,b" (lora-scripts style); not for prompts
        "tasks": tasks,  # the task types the key applies to (None: all); set for another task, it is refused
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    if default is REQUIRED:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # -- what to train
    base_model: str = option(
        REQUIRED,
        "Base model: a local diffusers/transformers folder, a single-file .safetensors checkpoint "
        "(with base_model_config), a hub id, an s3:// URI, or a built-in preset such as preset:tiny-sd.",
        aliases=("model_name_or_path", "pretrained_model_name_or_path", "pretrained_model"),
        group="model",
    )
    train_data_dir: str = option(
        REQUIRED,
        "Training data: an image folder (text-to-image) or a .jsonl file or folder of them "
        "(text-generation); local path or s3:// URI.",
        aliases=("data_dir", "dataset", "instance_data_dir", "dataset_path"),
        group="data",
    )
    task_type: str = option("text-to-image", "What to train.", aliases=("task",), choices=TASKS, group="model")
    model_family: str = option(
        "auto",
        "text-to-image model family; auto detects it from the pipeline class in model_index.json.",
        choices=MODEL_FAMILIES,
        group="model",
        tasks=T2I,
    )
    base_model_config: str | None = option(
        None,
        "For a single-file checkpoint: a local diffusers folder (or hub id) holding the model configs.",
        aliases=("original_config",),
        group="model",
    )
    base_quantization: str = option(
        "none",
        "Keep the frozen base weights (the LLM; the UNet or transformer) quantized: int8 or fp8 (torchao "
        "weight-only), or nf4 (bitsandbytes 4-bit NormalFloat with double quantization: QLoRA). LoRA weights "
        "train in fp32 and the output files do not change. nf4 of a text-to-image base needs a CUDA GPU; a "
        "mode the device cannot run is refused at start (docs/quantization-and-packing.md).",
        choices=QUANTIZATION_MODES,
        group="model",
    )
    quantize_text_encoders: bool = option(
        False,
        "Load the frozen text encoders quantized too, in base_quantization's format (they are 5-20 GB in the "
        "flow-matching families). Their outputs change by the quantization error, and cached embeddings are "
        "kept apart from unquantized ones. Not with train_text_encoder.",
        group="model",
        tasks=T2I,
    )
    description: str = option("", "Purpose of this run, written into EXPERIMENT.md.", group="general")

    # -- data
    metadata_path: str | None = option(
        None,
        "Captions as a CSV with columns file_name,text (default: <train_data_dir>/metadata.csv, "
        "else .txt files beside the images).",
        group="data",
        tasks=T2I,
    )
    caption_column: str = option("text", "Caption column of metadata.csv.", group="data", tasks=T2I)
    image_column: str = option("file_name", "Image file column of metadata.csv.", group="data", tasks=T2I)
    caption_extension: str = option(".txt", "Extension of caption files beside the images.", group="data", tasks=T2I)
    resolution: int = option(512, "Images are resized and cropped to this square size.", min=8, group="data", tasks=T2I)
    center_crop: bool = option(False, "Center crop instead of random crop.", group="data", tasks=T2I)
    random_flip: bool = option(False, "Randomly flip images horizontally.", group="data", tasks=T2I)
    enable_bucket: bool = option(
        False,
        "Aspect-ratio bucketing: each image trains at the bucket closest to its shape (no subject "
        "cropped away), batches never mix buckets.",
        group="data",
        tasks=T2I,
    )
    min_bucket_reso: int = option(256, "Smallest bucket side.", min=8, group="data", tasks=T2I)
    max_bucket_reso: int = option(1024, "Largest bucket side.", min=8, group="data", tasks=T2I)
    bucket_reso_steps: int = option(64, "Bucket sides are multiples of this.", min=1, group="data", tasks=T2I)
    cache_latents: bool = option(
        False,
        "Encode each image with the VAE once and reuse the result (needs center_crop; flips are "
        "cached too). Entries are keyed by content and reused across runs.",
        group="data",
        tasks=T2I,
    )
    cache_text_encoder_outputs: bool | None = option(
        None,
        "Encode each caption once and reuse the result (not with train_text_encoder). Default: on for the "
        "flow-matching families (their text encoders are then released before training), off for sd/sdxl.",
        group="data",
        tasks=T2I,
    )
    cache_dir: str | None = option(
        None,
        "Where cached latents and text-encoder outputs live (default: ~/.cache/lora-operator/features).",
        group="data",
    )
    dataset_format: str = option(
        "auto",
        "text-generation JSONL format: text, prompt_completion, chat, or auto (read from each record's keys).",
        choices=DATASET_FORMATS,
        group="data",
        tasks=LLM,
    )
    max_seq_length: int = option(
        512, "Token sequences are truncated to this length (reported, never silent).", min=8, group="data", tasks=LLM
    )
    packing: bool = option(
        False,
        "Pack the samples into rows of up to max_seq_length tokens (best-fit decreasing), positions restarting "
        "and attention never crossing samples; losses are those of the unpacked samples. batch_size then counts "
        "rows.",
        aliases=("sample_packing",),
        group="data",
        tasks=LLM,
    )
    num_workers: int | None = option(
        None,
        "Data loader worker processes (default: 0 on CPU, up to 8 on a GPU).",
        aliases=("dataloader_num_workers", "max_data_loader_n_workers"),
        min=0,
        group="data",
    )
    auto_label: bool = option(
        False,
        "Caption the images that have no caption with label_model before training, into metadata.csv "
        "in train_data_dir (or in output_dir when that folder is read-only).",
        group="data",
        tasks=T2I,
    )
    dataset_read_only: bool = option(
        False,
        "Never write into train_data_dir: auto_label puts its metadata.csv into output_dir instead. "
        "Always on for an s3:// dataset (its local copy is a download cache; the captions reach S3 with the "
        "outputs).",
        group="data",
        tasks=T2I,
    )
    label_model: str = option(
        "Salesforce/blip-image-captioning-base",
        "Captioning model of auto_label and lora-label: a hub id, local folder or preset:tiny-blip.",
        group="data",
        tasks=T2I,
    )
    caption_prefix: str = option(
        "",
        "Put before each new auto_label caption with ', ' (a trigger word: 'sks' -> 'sks, a photo of ...').",
        aliases=("trigger_word",),
        group="data",
        tasks=T2I,
    )
    caption_suffix: str = option("", "Put after each new auto_label caption with ', '.", group="data", tasks=T2I)
    label_batch_size: int = option(8, "Images per captioning batch.", min=1, group="data", tasks=T2I)

    # -- LoRA
    lora_rank: int = option(16, "LoRA rank r.", aliases=("rank", "network_dim", "lora_r"), min=1, group="lora")
    network_alpha: float | None = option(
        None,
        "LoRA alpha; the update is scaled by alpha/rank. Default: equal to lora_rank (scale 1).",
        aliases=("lora_alpha", "alpha"),
        min=0,
        min_exclusive=True,
        group="lora",
    )
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch.", min=0, max=1, group="lora")
    target_modules: list[str] | None = option(
        None,
        "Module names that get LoRA (a name matches a module whose path ends with it). Default: the model "
        "family's reference targets (docs/model-families.md) or q_proj,v_proj (text-generation).",
        group="lora",
    )
    train_text_encoder: bool = option(False, "Also train LoRA on the text encoder(s).", group="lora", tasks=T2I)
    text_encoder_lr: float | None = option(
        None, "Learning rate of the text-encoder LoRA (default: learning_rate).", min=0, group="lora", tasks=T2I
    )

    # -- optimization
    batch_size: int = option(1, "Samples per step.", aliases=("train_batch_size",), min=1, group="training")
    gradient_accumulation_steps: int = option(1, "Batches accumulated per optimizer step.", min=1, group="training")
    epochs: int = option(
        1,
        "Passes over the data (ignored when max_train_steps is set).",
        aliases=("num_train_epochs", "max_train_epochs"),
        min=1,
        group="training",
    )
    max_train_steps: int | None = option(
        None, "Optimizer steps to train; overrides epochs.", aliases=("max_steps",), min=1, group="training"
    )
    learning_rate: float = option(
        1e-4, "Peak learning rate.", aliases=("lr", "unet_lr"), min=0, min_exclusive=True, group="training"
    )
    lr_scheduler: str = option(
        "constant", "Learning-rate schedule.", aliases=("lr_scheduler_type",), choices=LR_SCHEDULERS, group="training"
    )
    lr_warmup_steps: int = option(0, "Linear warmup steps.", aliases=("warmup_steps",), min=0, group="training")
    lr_num_cycles: int = option(1, "Cycles of cosine_with_restarts.", min=1, group="training")
    adam_beta1: float = option(0.9, "AdamW beta1.", min=0, max=1, group="training")
    adam_beta2: float = option(0.999, "AdamW beta2.", min=0, max=1, group="training")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay.", aliases=("weight_decay",), min=0, group="training")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.", min=0, min_exclusive=True, group="training")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).", min=0, group="training")
    mixed_precision: str = option(
        "no",
        "Autocast precision: no, fp16 (CUDA only) or bf16.",
        aliases=("precision",),
        choices=MIXED_PRECISION,
        group="training",
    )
    gradient_checkpointing: bool | None = option(
        None, "Trade compute for memory. Default: on for the flow-matching families, off otherwise.", group="training"
    )
    chunked_cross_entropy: bool = option(
        False,
        "Compute the loss through the output layer a chunk of tokens at a time, each chunk's logits recomputed "
        "in the backward pass: the (tokens x vocabulary) logits never exist whole.",
        group="training",
        tasks=LLM,
    )
    torch_compile: bool = option(
        False,
        "Compile the model's layers with torch.compile (the first steps compile; on CPU it needs a C++ compiler).",
        group="training",
        tasks=LLM,
    )
    seed: int = option(42, "Seed of every random choice; same seed, same run.", min=0, group="training")
    device: str = option("auto", "auto (CUDA if present), cpu or cuda.", choices=DEVICES, group="training")
    distributed_strategy: str = option(
        "ddp",
        "With several processes: ddp keeps a whole copy of the model in every process; fsdp shards the frozen "
        "base's blocks (the LLM's decoder layers; the UNet's or transformer's blocks) over the processes with "
        "FSDP2, for bases that do not fit one GPU. LoRA weights and their optimizer state stay whole in every "
        "process, so the results, the output files and the checkpoints are those of ddp (either resumes the "
        "other). One process has nothing to shard and trains as ddp. With base_quantization nf4 the blocks are "
        "sharded quantized (torchao's NF4Tensor); int8 and fp8 cannot be sharded and are refused "
        "(docs/distributed.md).",
        choices=DISTRIBUTED_STRATEGIES,
        group="training",
    )
    snr_gamma: float | None = option(
        None,
        "Min-SNR loss weighting gamma (5.0 is common); off when unset.",
        min=0,
        min_exclusive=True,
        group="training",
        tasks=T2I,
    )
    noise_offset: float = option(
        0.0, "Noise offset (0.05-0.1 helps very dark/bright images).", min=0, group="training", tasks=T2I
    )
    prediction_type: str | None = option(
        None, "Override the scheduler's prediction type.", choices=PREDICTION_TYPES, group="training", tasks=T2I
    )

    # -- flow matching (flux1, flux2, sd3, qwen-image, z-image)
    weighting_scheme: str | None = option(
        None,
        "How timesteps are sampled (logit_normal, mode) or weighted (sigma_sqrt, cosmap); none samples them "
        "uniformly. Default: the family's reference trainer (logit_normal for sd3, none otherwise).",
        choices=WEIGHTING_SCHEMES,
        group="flow",
        tasks=T2I,
    )
    logit_mean: float = option(0.0, "Mean of logit_normal timestep sampling.", group="flow", tasks=T2I)
    logit_std: float = option(
        1.0, "Standard deviation of logit_normal timestep sampling.", min=0, min_exclusive=True, group="flow", tasks=T2I
    )
    mode_scale: float = option(1.29, "Scale of mode timestep sampling.", group="flow", tasks=T2I)
    timestep_shift: float | None = option(
        None,
        "Shift of the noise levels toward noise: sigma' = s*sigma / (1 + (s-1)*sigma). Default: the static "
        "shift in the model's scheduler config (3.0 for sd3 and z-image; none where the scheduler shifts by "
        "resolution).",
        aliases=("discrete_flow_shift", "flow_schedule_shift"),
        min=0,
        min_exclusive=True,
        group="flow",
        tasks=T2I,
    )
    resolution_shift: bool = option(
        False,
        "Shift the noise levels by image size as the scheduler does at inference (FLUX's base_shift/"
        "max_shift between base_image_seq_len and max_image_seq_len) instead of a static shift.",
        aliases=("flow_schedule_auto_shift",),
        group="flow",
        tasks=T2I,
    )
    guidance_scale: float = option(
        1.0,
        "Guidance input of guidance-distilled models (FLUX.1-dev, FLUX.2-dev) during training.",
        min=0,
        group="flow",
        tasks=T2I,
    )
    max_sequence_length: int | None = option(
        None,
        "Longest prompt of the family's main text encoder, in tokens (T5, Qwen, Mistral). Default: the "
        "reference trainer's (512; 77 for sd3).",
        min=8,
        group="flow",
        tasks=T2I,
    )

    # -- validation
    validation_prompts: list[str] | None = option(
        None,
        "text-to-image: prompts sampled with a fixed seed every validation_steps and at the end.",
        aliases=("validation_prompt", "sample_prompts"),
        comma_list=False,
        group="validation",
        tasks=T2I,
    )
    validation_steps: int = option(
        0,
        "Validate every N optimizer steps and after the last one (0: only after the last one, if configured).",
        aliases=("sample_every_n_steps",),
        min=0,
        group="validation",
    )
    validation_seed: int = option(
        0, "Seed of the validation samples (same seed, comparable images).", min=0, group="validation", tasks=T2I
    )
    validation_inference_steps: int = option(
        20, "Denoising steps per validation image.", aliases=("sample_steps",), min=1, group="validation", tasks=T2I
    )
    validation_guidance_scale: float | None = option(
        None,
        "Guidance of validation images. Default: the family's (7.5 for sd/sdxl, 3.5 for flux1 ...).",
        min=0,
        group="validation",
        tasks=T2I,
    )
    validation_data: str | None = option(
        None,
        "text-generation: held-out JSONL whose loss is measured every validation_steps.",
        group="validation",
        tasks=LLM,
    )
    validation_split: float = option(
        0.0,
        "text-generation: fraction of the records held out (seeded) for validation loss instead.",
        min=0,
        max=0.5,
        group="validation",
        tasks=LLM,
    )

    # -- outputs
    output_dir: str = option("./output", "Where outputs go (local or s3://).", group="output")
    output_name: str | None = option(
        None, "Base name of the kohya-format file (default: the output_dir folder name).", group="output"
    )
    save_formats: list[str] = option(
        ["diffusers", "kohya"],
        "Final weight formats for text-to-image.",
        choices=SAVE_FORMATS,
        group="output",
        tasks=T2I,
    )
    logging_dir: str | None = option(None, "TensorBoard folder (default: <output_dir>/logs).", group="output")
    save_steps: int = option(
        500,
        "Checkpoint every N optimizer steps (0: only the final one).",
        aliases=("checkpointing_steps", "save_every_n_steps"),
        min=0,
        group="output",
    )
    keep_checkpoints: int | None = option(
        None,
        "Keep only the newest N step checkpoints (default: all).",
        aliases=("save_total_limit", "checkpoints_total_limit", "save_last_n_steps"),
        min=1,
        group="output",
    )
    logging_steps: int = option(
        10, "Print a progress line every N steps when not on a terminal.", min=1, group="output"
    )
    resume: str | None = option(
        None,
        "latest (newest complete checkpoint in output_dir) or a checkpoint folder. Default: latest when "
        "output_dir is s3:// or LORA_JOB_NAME is set (in a pod), else none.",
        aliases=("resume_from_checkpoint",),
        group="output",
    )
    overwrite: bool = option(False, "Allow replacing a finished or started run in output_dir.", group="output")

    # -- storage, metrics and the cluster (docs/trainer-operator.md)
    s3_endpoint_url: str | None = option(
        None,
        "S3-compatible endpoint such as http://minio:9000 (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, "
        "else AWS). Credentials and region always come from the standard AWS environment.",
        aliases=("s3_endpoint",),
        group="cluster",
    )
    s3_cache_dir: str | None = option(
        None,
        "Local folder for s3:// downloads and the working copy of an s3:// output_dir "
        "(default: $LORA_CACHE_DIR/s3, else ~/.cache/lora-operator/s3).",
        group="cluster",
    )
    s3_max_concurrency: int = option(
        16, "Parallel S3 requests of downloads and uploads.", min=1, max=256, group="cluster"
    )
    s3_retry_seconds: float = option(
        300.0,
        "How long transient S3 errors (5xx, throttling, connection failures) are retried before the run "
        "stops with exit 8 (retried by the operator).",
        min=0,
        group="cluster",
    )
    s3_upload_queue: int = option(
        4, "Checkpoints that may wait for upload before training pauses for S3.", min=1, group="cluster"
    )
    s3_sync_seconds: float = option(
        60.0,
        "Upload changed logs and records (TensorBoard, EXPERIMENT.md) at least this often.",
        min=1,
        group="cluster",
    )
    sigterm_grace_seconds: float = option(
        25.0,
        "After SIGTERM, how long the checkpoint upload may take before the trainer exits (keep it below "
        "the pod's terminationGracePeriodSeconds).",
        min=0,
        group="cluster",
    )
    metrics_port: int = option(
        9400, "Port of the Prometheus /metrics endpoint (0: off).", min=0, max=65535, group="cluster"
    )
    metrics_bind: str | None = option(
        None, "Address of the metrics endpoint (default: $POD_IP, else 127.0.0.1).", group="cluster"
    )
    pushgateway_url: str | None = option(
        None, "Prometheus Pushgateway that receives the metrics every logging_steps and at exit.", group="cluster"
    )
    termination_message_path: str = option(
        "/dev/termination-log",
        "File for the one-line JSON exit summary (the default is written only where it "
        "exists: in a pod). $LORA_TERMINATION_MESSAGE_PATH overrides the default.",
        group="cluster",
    )


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def alias_table() -> dict[str, str]:
    """alias -> canonical key, canonical keys included."""
    table: dict[str, str] = {}
    for f in config_fields():
        table[f.name] = f.name
        for alias in f.metadata["aliases"]:
            table[alias] = f.name
    return table
