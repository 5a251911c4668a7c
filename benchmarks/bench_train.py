"""Training throughput: our recipe against a plain reference loop doing the same math, in one run.

    python benchmarks/bench_train.py                      # tiny presets on CPU
    python benchmarks/bench_train.py --arch real --device cuda   # SD1.5-size UNet @512 and a 1B Llama
    python benchmarks/bench_train.py --arch real --task text-to-image --set mixed_precision=no --steps 4 --warmup 1
    python benchmarks/bench_train.py --task flux1          # tiny FLUX.1 against train_dreambooth_lora_flux.py's math
    python benchmarks/bench_train.py --arch real --task flux1 --device cuda --set resolution=1024

Each measurement runs in its own subprocess (so peak memory is its own). The reference loops are the
diffusers text-to-image LoRA example's loop, the FLUX.1 DreamBooth LoRA example's step (prompts embedded
once, as both loops do by default) and a plain peft+transformers loop: same models, LoRA config, data,
batch size, optimizer and steps. Printed: the median step time over every timed step of every run (the
ratio of medians is "vs ref": on a shared machine a median is steadier than a best mean), and from each
loop's run of best mean: its mean step, samples/s or tokens/s, peak memory, the split of step time into
data loading, forward+backward and optimizer, and the checkpoint time.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "trainer_image" / "lora_trainer" / "sample_data"

SETUPS = {
    ("tiny", "text-to-image"): dict(
        base_model="preset:tiny-sd", train_data_dir=str(SAMPLE / "images"), resolution=32, batch_size=8
    ),
    ("tiny", "text-generation"): dict(
        task_type="text-generation",
        base_model="preset:tiny-llm",
        train_data_dir=str(SAMPLE / "text"),
        max_seq_length=96,
        batch_size=8,
    ),
    ("real", "text-to-image"): dict(
        base_model="preset:bench-sd15",
        train_data_dir=str(SAMPLE / "images"),
        resolution=512,
        batch_size=1,
        mixed_precision="bf16",
    ),
    ("real", "text-generation"): dict(
        task_type="text-generation",
        base_model="preset:bench-llama-1b",
        train_data_dir=str(SAMPLE / "text"),
        max_seq_length=512,
        batch_size=8,
        mixed_precision="bf16",
    ),
    ("tiny", "flux1"): dict(
        base_model="preset:tiny-flux1",
        train_data_dir=str(SAMPLE / "images"),
        resolution=32,
        batch_size=8,
        gradient_checkpointing=False,
    ),
    # a FLUX.1-dev-size transformer (11.9B, random weights, bf16) with its VAE; text encoders only as wide as
    # FLUX's (their outputs are embedded once), on a GPU
    ("real", "flux1"): dict(
        base_model="preset:bench-flux1",
        train_data_dir=str(SAMPLE / "images"),
        resolution=512,
        batch_size=1,
        mixed_precision="bf16",
        gradient_checkpointing=True,
    ),
}
COMMON = dict(lora_rank=16, learning_rate=1e-4, seed=0, num_workers=0)


def config_for(arch: str, task: str, steps: int, device: str, out: str) -> dict:
    return {
        **SETUPS[(arch, task)],
        **COMMON,
        "max_train_steps": steps,
        "save_steps": steps - 1,
        "device": device,
        "output_dir": out,
        "overwrite": True,
    }


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- ours
def run_ours(raw: dict, warmup: int, setup: str) -> dict:
    from lora_trainer.config import build_config
    from lora_trainer.observers import BaseObserver
    from lora_trainer.recipe import TrainingRecipe

    cfg = build_config(raw)
    recipe = TrainingRecipe(cfg, observers=[], profile=True)
    marks: dict = {}
    steps: list[float] = []

    class Mark(BaseObserver):
        def on_step(self, stats):
            if stats.step > warmup:
                steps.append(stats.step_seconds)
            if stats.step == warmup:
                marks["phases"], marks["time"] = dict(recipe.stopwatch.totals), time.perf_counter()
                marks["samples"], marks["tokens"] = recipe.summary.samples, recipe.summary.tokens

    recipe.observers = [Mark()]
    recipe.run()
    s = recipe.summary
    phases = {k: v - marks["phases"].get(k, 0.0) for k, v in recipe.stopwatch.totals.items()}
    measured = s.step - warmup
    train = phases.get("data", 0) + phases.get("forward_backward", 0) + phases.get("optimizer", 0)
    return {
        "step_s": train / measured,
        "steps_s": steps,
        "samples": s.samples - marks["samples"],
        "tokens": s.tokens - marks["tokens"],
        "train_s": train,
        "data_s": phases.get("data", 0),
        "fwd_bwd_s": phases.get("forward_backward", 0),
        "optim_s": phases.get("optimizer", 0),
        "checkpoint_s": phases.get("checkpoint", 0),
        "peak_bytes": peak_memory(recipe.device),
    }


# -- the reference loops
class Timer:
    def __init__(self, device):
        self.device, self.totals = device, {"data": 0.0, "fwd_bwd": 0.0, "optim": 0.0}

    def span(self, name, start):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[name] += now - start
        return now


def run_reference(raw: dict, warmup: int, setup: str) -> dict:
    from lora_trainer.config import build_config
    from lora_trainer.recipe import pick_device

    cfg = build_config(raw)
    device, dtype = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    step_fn, loader, params, save = REFERENCES[setup](cfg, device, dtype)
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=device.type == "cuda"
    )
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler("constant", optimizer=optimizer)
    timer, step, samples, tokens, ckpt_s, steps = Timer(device), 0, 0, 0, 0.0, []
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.mixed_precision == "bf16"
        else torch.autocast(device.type, enabled=False)
    )
    while step < cfg.max_train_steps:
        t = time.perf_counter()
        for batch in loader:
            if step == warmup:
                timer.totals = {k: 0.0 for k in timer.totals}
                samples = tokens = 0
            began = t
            t = timer.span("data", t)
            with autocast:
                loss = step_fn(batch)
            loss.backward()
            loss.item()
            t = timer.span("fwd_bwd", t)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            t = timer.span("optim", t)
            if step >= warmup:
                steps.append(t - began)
            step += 1
            samples += batch["n"]
            tokens += batch.get("tokens", 0)
            if step == cfg.save_steps:
                start = time.perf_counter()
                save()
                ckpt_s = time.perf_counter() - start
                t = time.perf_counter()
            if step >= cfg.max_train_steps:
                break
    train = sum(timer.totals.values())
    return {
        "step_s": train / (step - warmup),
        "steps_s": steps,
        "samples": samples,
        "tokens": tokens,
        "train_s": train,
        "data_s": timer.totals["data"],
        "fwd_bwd_s": timer.totals["fwd_bwd"],
        "optim_s": timer.totals["optim"],
        "checkpoint_s": ckpt_s,
        "peak_bytes": peak_memory(device),
    }


def reference_sd(cfg, device, dtype):
    """The loop of https://github.com/huggingface/diffusers/blob/main/examples/text_to_image/train_text_to_image_lora.py,
    minus accelerate."""
    import numpy as np
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from lora_trainer.base_model import resolve_local_model
    from lora_trainer.data.images import read_metadata_csv

    src = resolve_local_model(cfg)
    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder").requires_grad_(False).to(device, dtype)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae").requires_grad_(False).to(device, dtype)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet").requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler")
    unet.add_adapter(
        LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    unet.to(device, dtype)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    folder = Path(cfg.train_data_dir)
    captions = read_metadata_csv(folder / "metadata.csv", "file_name", "text")
    res = cfg.resolution

    def item(name):
        image = Image.open(folder / name).convert("RGB").resize((res, res), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        ids = tokenizer(
            captions[name],
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        return pixels, ids

    def collate(names):
        pixels, ids = zip(*(item(n) for n in names))
        return {"pixel_values": torch.stack(pixels), "input_ids": torch.stack(ids), "n": len(names)}

    loader = torch.utils.data.DataLoader(list(captions), batch_size=cfg.batch_size, shuffle=True, collate_fn=collate)

    def step(batch):
        latents = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
        pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")

    def save():
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(tempfile.mkdtemp(), unet_lora_layers=state, safe_serialization=True)

    return step, loader, [p for p in unet.parameters() if p.requires_grad], save


def reference_llm(cfg, device, dtype):
    """A plain peft + transformers loop on the same tokenized data."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_trainer.base_model import resolve_local_model
    from lora_trainer.data.text import IGNORE_INDEX, collate_tokens, tokenize_dataset
    from lora_trainer.tasks.text_generation import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    data = tokenize_dataset(cfg.train_data_dir, tokenizer, "auto", cfg.max_seq_length)
    model = AutoModelForCausalLM.from_pretrained(resolve_local_model(cfg), dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM", r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=["q_proj", "v_proj"]
        ),
    ).to(device)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    pad = collate_tokens(tokenizer.pad_token_id)

    def collate(examples):
        batch = pad(examples)
        return {**batch, "n": len(examples), "tokens": int((batch["labels"] != IGNORE_INDEX).sum())}

    loader = torch.utils.data.DataLoader(data.examples, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate)

    def step(batch):
        inputs = {k: batch[k].to(device) for k in ("input_ids", "labels", "attention_mask")}
        return model(**inputs, use_cache=False).loss

    return (
        step,
        loader,
        [p for p in model.parameters() if p.requires_grad],
        lambda: model.save_pretrained(tempfile.mkdtemp()),
    )


def reference_flux1(cfg, device, dtype):
    """The step of https://github.com/huggingface/diffusers/blob/main/examples/dreambooth/train_dreambooth_lora_flux.py
    (uniform noise levels on the scheduler's grid, packed latents, guidance input, velocity target) with its
    default LoRA targets, prompts embedded once."""
    import numpy as np
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image

    from lora_trainer.base_model import resolve_local_model
    from lora_trainer.data.images import read_metadata_csv

    pipe = FluxPipeline.from_pretrained(resolve_local_model(cfg), torch_dtype=dtype)
    folder = Path(cfg.train_data_dir)
    captions = read_metadata_csv(folder / "metadata.csv", "file_name", "text")
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(
            list(captions.values()), prompt_2=None, device=device, max_sequence_length=512
        )
    row = {name: i for i, name in enumerate(captions)}
    vae, transformer, scheduler = pipe.vae.to(device).requires_grad_(False), pipe.transformer, pipe.scheduler
    del pipe.text_encoder, pipe.text_encoder_2
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_rank,
            init_lora_weights="gaussian",
            target_modules=[
                "attn.to_k",
                "attn.to_q",
                "attn.to_v",
                "attn.to_out.0",
                "attn.add_k_proj",
                "attn.add_q_proj",
                "attn.add_v_proj",
                "attn.to_add_out",
                "ff.net.0.proj",
                "ff.net.2",
                "ff_context.net.0.proj",
                "ff_context.net.2",
            ],
        )
    )
    transformer.to(device)
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    res, factor = cfg.resolution, 2 ** (len(vae.config.block_out_channels) - 1)

    def collate(names):
        pixels = [
            torch.from_numpy(
                np.asarray(Image.open(folder / n).convert("RGB").resize((res, res), Image.BICUBIC), dtype=np.float32)
                / 127.5
                - 1
            ).permute(2, 0, 1)
            for n in names
        ]
        return {"pixel_values": torch.stack(pixels), "rows": [row[n] for n in names], "n": len(names)}

    loader = torch.utils.data.DataLoader(list(captions), batch_size=cfg.batch_size, shuffle=True, collate_fn=collate)

    def step(batch):
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.sample()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        b, c, h, w = latents.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling("none", b)
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices].to(device)
        sigmas = scheduler.sigmas[indices].to(device).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        guidance = torch.full((b,), 1.0, device=device) if transformer.config.guidance_embeds else None
        pred = transformer(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=pooled[batch["rows"]],
            encoder_hidden_states=embeds[batch["rows"]],
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        pred = FluxPipeline._unpack_latents(pred, h * factor, w * factor, factor)
        weighting = compute_loss_weighting_for_sd3("none", sigmas)
        return torch.mean(
            (weighting.float() * (pred.float() - (noise - latents).float()) ** 2).reshape(b, -1), 1
        ).mean()

    def save():
        FluxPipeline.save_lora_weights(
            tempfile.mkdtemp(), transformer_lora_layers=get_peft_model_state_dict(transformer)
        )

    return step, loader, [p for p in transformer.parameters() if p.requires_grad], save


REFERENCES = {"text-to-image": reference_sd, "text-generation": reference_llm, "flux1": reference_flux1}


# -- driver
def measure(kind: str, arch: str, task: str, steps: int, warmup: int, device: str, **overrides) -> dict:
    """Runs one measurement in a fresh process; adds its wall time (setup included) as `wall_s`."""
    with tempfile.TemporaryDirectory() as out:
        raw = {**config_for(arch, task, steps, device, out), **overrides}
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--raw",
            json.dumps(raw),
            "--warmup",
            str(warmup),
            "--task",
            task,
        ]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{kind} {arch} {task} failed:\n{proc.stderr[-3000:]}")
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - started}


def table(rows: list[dict]) -> str:
    head = (
        "task",
        "loop",
        "median step ms",
        "best mean ms",
        "throughput",
        "peak MiB",
        "data %",
        "fwd+bwd %",
        "optim %",
        "ckpt ms",
        "vs ref",
    )
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        m = r["m"]
        rate = f"{m['tokens'] / m['train_s']:.4g} tok/s" if m["tokens"] else f"{m['samples'] / m['train_s']:.3g} img/s"
        pct = lambda k, m=m: f"{100 * m[k] / m['train_s']:.1f}"  # noqa: E731
        lines.append(
            " | ".join(
                [
                    r["task"],
                    r["kind"],
                    f"{1000 * r['median_s']:.1f}",
                    f"{1000 * m['step_s']:.1f}",
                    rate,
                    f"{m['peak_bytes'] / 2**20:.0f}",
                    pct("data_s"),
                    pct("fwd_bwd_s"),
                    pct("optim_s"),
                    f"{1000 * m['checkpoint_s']:.1f}",
                    r.get("ratio", ""),
                ]
            )
        )
    return "\n".join(lines)


def parse_override(item: str) -> tuple[str, object]:
    import yaml

    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item}: expected KEY=VALUE")
    return key.strip(), yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="alternate ours/reference this many times")
    parser.add_argument(
        "--task",
        choices=["text-to-image", "text-generation", "flux1"],
        action="append",
        help="measure only this task (repeatable); default both",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key of both loops, e.g. --set mixed_precision=no (YAML value)",
    )
    parser.add_argument("--worker", choices=["ours", "reference"])
    parser.add_argument("--raw")
    args = parser.parse_args()
    if args.worker:
        fn = run_ours if args.worker == "ours" else run_reference
        print(json.dumps(fn(json.loads(args.raw), args.warmup, args.task[0])))
        return
    overrides = dict(parse_override(item) for item in args.set)
    rows = []
    for task in args.task or ("text-to-image", "text-generation"):
        best, steps = {}, {"reference": [], "ours": []}
        for _ in range(args.repeats):  # interleaved: the machine is shared and noisy
            for kind in ("reference", "ours"):
                m = measure(kind, args.arch, task, args.steps, args.warmup, args.device, **overrides)
                steps[kind] += m["steps_s"]
                if kind not in best or m["step_s"] < best[kind]["step_s"]:
                    best[kind] = m
        median = {kind: statistics.median(times) for kind, times in steps.items()}
        ratio = median["ours"] / median["reference"]
        rows += [
            {"task": task, "kind": "reference", "m": best["reference"], "median_s": median["reference"]},
            {"task": task, "kind": "ours", "m": best["ours"], "median_s": median["ours"], "ratio": f"{ratio:.3f}x"},
        ]
    print(
        f"arch={args.arch} device={args.device} steps={args.steps} (first {args.warmup} not timed), "
        f"{args.repeats} runs each: median of all their steps, the rest from the run of best mean, torch {torch.__version__}, {torch.get_num_threads()} threads"
        + "".join(f", {item}" for item in args.set)
    )
    print(table(rows))
    if any(math.isnan(r["m"]["step_s"]) for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
