"""LLM LoRA side by side: our trainer against TRL's SFTTrainer (with a peft LoraConfig), padded and packed, and
ours with each base_quantization mode the device runs, on the same model, data, LoRA and batch size.

    python benchmarks/bench_llm.py                          # a 4-layer, 256-wide Llama on CPU
    python benchmarks/bench_llm.py --compile                # also ours with torch_compile (minutes to compile on CPU)
    python benchmarks/bench_llm.py --arch wide --steps 4 --warmup 1   # the memory of each base_quantization, on CPU
    python benchmarks/bench_llm.py --arch real --device cuda   # an 8B-class Llama (random weights): QLoRA and bf16 LoRA

TRL is the `bench` extra, not in the tested set that scripts/setup.sh installs into .venv; give it a venv of its own:
`UV_PROJECT_ENVIRONMENT=../venv-bench scripts/uv.sh sync --locked --extra trainer --extra test --extra bench`, then
run this script with that venv's python.

Each row runs in its own process (its peak memory is its own). Data: JSONL text records of random lengths
up to max_seq_length, so padded batches carry padding and packing can remove it. Printed per row: tokens/s
counting only real (non-padding) tokens, the share of padding in what the model computed, peak memory (CUDA:
max allocated; CPU: the process's peak RSS, Python and libraries included) and the bytes of the frozen
weights as stored. "train peak" is the memory the training holds at its peak beyond what the process held
before the model loaded (CUDA: max allocated; CPU: the peak resident set during the steps, reset after the
model loaded, minus the resident set before it loaded, libraries imported), so the memory target can be read:
a quantized row's train peak against its frozen bytes plus what the unquantized row holds besides its frozen
bytes (LoRA, optimizer, activations), printed as "memory vs weights + rest". The first --warmup steps are not
timed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SETUPS = {  # per arch: the model, and what both loops train with
    "tiny": dict(model="bench-llm-small", max_seq_length=512, batch_size=8, records=384, mixed_precision="no"),
    "real": dict(model="preset:bench-llama-8b", max_seq_length=2048, batch_size=4, records=512, mixed_precision="bf16"),
    # frozen bytes nearly all in decoder layers (what base_quantization stores smaller): the memory rows on CPU
    "wide": dict(model="bench-llm-wide", max_seq_length=256, batch_size=4, records=64, mixed_precision="no"),
}
LORA = dict(lora_rank=16, network_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
ROWS = {  # arch -> (row name, loop, our config keys / TRL's equivalents)
    "tiny": [
        ("padded", "trl", {}),
        ("padded", "ours", {}),
        ("packed", "trl", {"packing": True}),
        ("packed", "ours", {"packing": True}),
        ("packed, chunked CE", "ours", {"packing": True, "chunked_cross_entropy": True}),
        ("packed, grad ckpt", "ours", {"packing": True, "gradient_checkpointing": True}),
        ("packed, int8 base", "ours", {"packing": True, "base_quantization": "int8"}),
        ("packed, fp8 base", "ours", {"packing": True, "base_quantization": "fp8"}),
        ("packed, nf4 base", "ours", {"packing": True, "base_quantization": "nf4"}),
    ],
    "real": [  # 8B: bf16 LoRA and QLoRA, both with checkpointing as they are run on one GPU
        ("bf16 LoRA, packed", "trl", {"packing": True, "gradient_checkpointing": True}),
        ("bf16 LoRA, packed", "ours", {"packing": True, "gradient_checkpointing": True}),
        ("QLoRA nf4, packed", "trl", {"packing": True, "gradient_checkpointing": True, "base_quantization": "nf4"}),
        ("QLoRA nf4, packed", "ours", {"packing": True, "gradient_checkpointing": True, "base_quantization": "nf4"}),
        (
            "QLoRA nf4, packed, chunked CE",
            "ours",
            {"packing": True, "gradient_checkpointing": True}
            | {"base_quantization": "nf4", "chunked_cross_entropy": True},
        ),
    ],
}
ROWS["wide"] = [
    ("padded", "ours", {}),
    ("int8 base", "ours", {"base_quantization": "int8"}),
    ("fp8 base", "ours", {"base_quantization": "fp8"}),
    ("nf4 base", "ours", {"base_quantization": "nf4"}),
]
COMPILE_ROW = ("packed, torch_compile", "ours", {"packing": True, "torch_compile": True})


def cache_dir() -> Path:
    from lora_trainer.presets import cache_root

    return cache_root() / "bench-llm"


# the Llamas the CPU archs train, over the tiny preset's byte-level tokenizer: (folder, vocabulary (None: the
# tokenizer's 261), hidden, intermediate, layers, heads, kv heads)
LLAMAS = {
    # Llama 2's 32000-token vocabulary (the tokenizer's ids fit): big enough that the model, not the loop's
    # overhead, takes the time on a CPU, and the logits weigh what they weigh in real LLMs
    "bench-llm-small": ("llama-256x4-v32000", 32000, 256, 688, 4, 8, 4),
    # 100M parameters, 99% of them in the decoder layers (what base_quantization stores smaller)
    "bench-llm-wide": ("llama-1024x8-v261", None, 1024, 2816, 8, 16, 4),
}


def llama(name: str) -> str:
    """The folder of one of LLAMAS, built with seed 0 the first time."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lora_trainer.presets import preset_path

    folder_name, vocab, hidden, intermediate, layers, heads, kv_heads = LLAMAS[name]
    folder = cache_dir() / folder_name
    if (folder / "config.json").is_file():
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(preset_path("preset:tiny-llm"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def model_path(arch: str) -> str:
    name = SETUPS[arch]["model"]
    if name.startswith("preset:"):
        from lora_trainer.presets import preset_path

        return str(preset_path(name))
    return llama(name)


def write_data(arch: str) -> Path:
    """Text records of uniformly random lengths (characters = tokens with the byte-level tokenizer)."""
    setup = SETUPS[arch]
    path = cache_dir() / f"text-{arch}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "lora", "rank", "token", "packing", "memory", "tensor"]
    lines = []
    for _ in range(setup["records"]):
        n = rng.randint(16, setup["max_seq_length"] - 8)
        text = ""
        while len(text) < n:
            text += rng.choice(words) + " "
        lines.append(json.dumps({"text": text[:n]}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_status(field: str) -> int:
    """A size from /proc/self/status (VmRSS: resident now, VmHWM: its peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def mapped_checkpoint_bytes() -> int:
    """Resident pages of mapped .safetensors files: after a quantized load they back no weight (the weights were
    copied out quantized), and the kernel may drop them at any time."""
    total, mapped = 0, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            mapped = head[-1] if len(head) >= 6 else ""
        elif head and head[0] == "Rss:" and mapped.endswith(".safetensors"):
            total += int(head[1]) * 1024
    return total


class TrainMemory:
    """What the training holds at its peak beyond the process before the model loaded (see the docstring).

    On CPU the workers run with a fixed glibc mmap threshold (measure() sets it), so freed tensors leave the
    resident set instead of staying in a heap that the dynamic threshold grows to keep them."""

    def __init__(self, device: str, quantized: bool):
        import bitsandbytes  # noqa: F401  the libraries a load imports, so the baseline holds them
        import peft  # noqa: F401
        import torchao  # noqa: F401
        import transformers  # noqa: F401

        self.device, self.quantized, self.before_load = device, quantized, proc_status("VmRSS")

    def training_starts(self) -> None:
        if self.device == "cpu":
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the resident set now

    def peak(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        unused = mapped_checkpoint_bytes() if self.quantized else 0
        return proc_status("VmHWM") - self.before_load - unused


class Counter:
    """Counts what the decoder computes: positions, and real tokens (attention_mask, else every position)."""

    def __init__(self, decoder: torch.nn.Module):
        self.positions = self.real = 0
        decoder.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        mask = kwargs.get("attention_mask")
        self.positions += ids.numel()
        self.real += int(mask.sum()) if mask is not None else ids.numel()


def result(seconds: float, real: int, positions: int, device: str, frozen: int, memory: TrainMemory) -> dict:
    return {
        "tokens_per_s": real / seconds,
        "padding": 1 - real / positions,
        "step_s": seconds,
        "peak_bytes": peak_memory(device),
        "train_peak_bytes": memory.peak(),
        "frozen_bytes": frozen,
    }


# -- ours
def run_ours(arch: str, device: str, keys: dict, steps: int, warmup: int) -> dict:
    from lora_trainer.config import build_config
    from lora_trainer.observers import BaseObserver
    from lora_trainer.quantization import frozen_weight_bytes
    from lora_trainer.recipe import TrainingRecipe

    setup = SETUPS[arch]
    memory = TrainMemory(device, keys.get("base_quantization", "none") != "none")
    with tempfile.TemporaryDirectory() as out:
        cfg = build_config(
            {
                "task_type": "text-generation",
                "base_model": model_path(arch),
                "train_data_dir": str(write_data(arch)),
                "dataset_format": "text",
                "max_seq_length": setup["max_seq_length"],
                "batch_size": setup["batch_size"],
                "mixed_precision": setup["mixed_precision"],
                "learning_rate": 1e-4,
                "max_train_steps": steps,
                "save_steps": 0,
                "seed": 0,
                "num_workers": 0,
                "device": device,
                "output_dir": out,
                **LORA,
                **keys,
            }
        )
        recipe = TrainingRecipe(cfg, observers=[])
        marks: dict = {}

        class Mark(BaseObserver):
            def on_start(self, info):
                marks["counter"] = Counter(recipe.task.causal_lm.get_decoder())
                memory.training_starts()

            def on_step(self, stats):
                if stats.step == warmup:
                    marks["start"] = (time.perf_counter(), recipe.summary.tokens + recipe.summary.samples)
                    marks["positions"] = marks["counter"].positions
                if stats.step == steps:  # before the final weights are written
                    marks["end"] = time.perf_counter()

        recipe.observers = [Mark()]
        recipe.run()
        started, real_before = marks["start"]
        real = recipe.summary.tokens + recipe.summary.samples - real_before  # text: every token but the first trains
        positions = marks["counter"].positions - marks["positions"]
        frozen = frozen_weight_bytes(recipe.task.model)
        return result(marks["end"] - started, real, positions, device, frozen, memory) | {"steps": steps - warmup}


# -- TRL
def run_trl(arch: str, device: str, keys: dict, steps: int, warmup: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lora_trainer.quantization import frozen_weight_bytes, load_kwargs

    setup = SETUPS[arch]
    source = model_path(arch)
    bf16 = setup["mixed_precision"] == "bf16"
    dtype = torch.bfloat16 if bf16 and device == "cuda" else torch.float32
    quantized = load_kwargs(keys.get("base_quantization", "none"), "transformers", dtype)
    memory = TrainMemory(device, bool(quantized))
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation="sdpa", device_map={"": device}, **quantized
    )
    records = [json.loads(line) for line in write_data(arch).read_text().splitlines()]
    marks: dict = {}

    class Mark(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            memory.training_starts()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                marks["start"] = (time.perf_counter(), counter.real, counter.positions)
            if state.global_step == steps:
                marks["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=model,
            processing_class=AutoTokenizer.from_pretrained(source),
            train_dataset=Dataset.from_list(records),
            peft_config=LoraConfig(
                r=LORA["lora_rank"],
                lora_alpha=LORA["network_alpha"],
                target_modules=LORA["target_modules"],
                task_type="CAUSAL_LM",
            ),
            args=SFTConfig(
                output_dir=out,
                per_device_train_batch_size=setup["batch_size"],
                max_steps=steps,
                learning_rate=1e-4,
                lr_scheduler_type="constant",
                weight_decay=0.01,
                max_length=setup["max_seq_length"],
                packing=keys.get("packing", False),
                gradient_checkpointing=keys.get("gradient_checkpointing", False),
                gradient_checkpointing_kwargs={"use_reentrant": False},
                bf16=bf16 and device == "cuda",
                use_cpu=device == "cpu",
                save_strategy="no",
                logging_steps=10**6,
                report_to=[],
                dataloader_num_workers=0,
                seed=0,
                disable_tqdm=True,
            ),
            callbacks=[Mark()],
        )
        counter = Counter(trainer.model.get_base_model().get_decoder())
        trainer.train()
    started, real_before, positions_before = marks["start"]
    real, positions = counter.real - real_before, counter.positions - positions_before
    frozen = frozen_weight_bytes(trainer.model)
    return result(marks["end"] - started, real, positions, device, frozen, memory) | {"steps": steps - warmup}


# -- driver
def available(device: str, keys: dict) -> str | None:
    """Why this device cannot run the row's base_quantization (None: it can)."""
    from lora_trainer.quantization import QuantizedBase

    return QuantizedBase(keys.get("base_quantization", "none"), "transformers", device).problem()


def measure(loop: str, arch: str, device: str, keys: dict, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", loop, "--arch", arch, "--device", device, "--keys", json.dumps(keys)]
    cmd += ["--steps", str(steps), "--warmup", str(warmup)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # see TrainMemory
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{loop} {keys} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[str, str, dict, str, str]]) -> str:
    head = ("setup", "loop", "tokens/s", "vs TRL", "padding", "step ms", "peak MiB", "frozen weights MiB")
    head += ("train peak MiB", "memory vs weights + rest")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, loop, m, ratio, memory in rows:
        cells = [
            name,
            loop,
            f"{m['tokens_per_s']:.0f}",
            ratio,
            f"{100 * m['padding']:.1f}%",
            f"{1000 * m['step_s'] / m['steps']:.0f}",
            f"{m['peak_bytes'] / 2**20:.0f}",
            f"{m['frozen_bytes'] / 2**20:.1f}",
            f"{m['train_peak_bytes'] / 2**20:.0f}",
            memory,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_check(m: dict, keys: dict, loop: str, unquantized: dict) -> str:
    """A quantized row's train peak over its frozen bytes plus what the same row unquantized (measured before
    it) holds besides its frozen bytes; the target is at most 1.10x."""
    plain = {k: v for k, v in keys.items() if k != "base_quantization"}
    same = (loop, json.dumps(plain, sort_keys=True))
    if plain == keys:
        unquantized[same] = m
        return ""
    if same not in unquantized:
        return ""
    base = unquantized[same]
    return f"{m['train_peak_bytes'] / (m['frozen_bytes'] + base['train_peak_bytes'] - base['frozen_bytes']):.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(SETUPS), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="measure every row this many times, keep the best")
    parser.add_argument("--compile", action="store_true", help="add ours with torch_compile")
    parser.add_argument("--only", action="append", metavar="SETUP", help="measure only these setups (repeatable)")
    parser.add_argument("--loop", choices=["ours", "trl"], help="measure only this loop's rows")
    parser.add_argument("--worker", choices=["ours", "trl"])
    parser.add_argument("--keys", default="{}")
    args = parser.parse_args()
    if args.worker:
        run = run_ours if args.worker == "ours" else run_trl
        print(json.dumps(run(args.arch, args.device, json.loads(args.keys), args.steps, args.warmup)))
        return
    rows, skipped, trl, unquantized = [], [], {}, {}
    for name, loop, keys in ROWS[args.arch] + ([COMPILE_ROW] if args.compile else []):
        if (args.only and name not in args.only) or (args.loop and loop != args.loop):
            continue
        problem = available(args.device, keys)
        if problem:
            skipped.append(f"{name} ({loop}): {problem}")
            continue
        runs = [measure(loop, args.arch, args.device, keys, args.steps, args.warmup) for _ in range(args.repeats)]
        best = max(runs, key=lambda m: m["tokens_per_s"])  # the machine is shared: the best run is the loop's
        if loop == "trl":
            trl[name] = best
        reference = trl.get(name) if loop == "ours" else None
        ratio = f"{best['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference else ""
        rows.append((name, loop, best, ratio, memory_check(best, keys, loop, unquantized)))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)  # a partial run still tells something
    setup = SETUPS[args.arch]
    print(
        f"arch={args.arch} ({setup['model']}, max_seq_length {setup['max_seq_length']}, batch {setup['batch_size']}, "
        f"{setup['mixed_precision']}) device={args.device} steps={args.steps} (first {args.warmup} not timed), "
        f"best of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(table(rows))
    for line in skipped:
        print(f"skipped: {line}")


if __name__ == "__main__":
    main()
