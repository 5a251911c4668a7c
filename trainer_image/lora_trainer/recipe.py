"""The training recipe: setup, train loop, save_checkpoint, finish, cleanup.

The loop reads like the algorithm: for each optimizer step, accumulate gradients over a group of
micro-batches, clip, step, schedule. Everything else (progress, TensorBoard, metrics, uploads) happens
in observers; task specifics (SD or LLM) live behind the Task interface.

With several processes (distributed.py) each trains its part of every global batch; the gradients, the
loss and the counts are summed over them once per optimizer step, and the main process alone writes
outputs and has observers. The global batch is batch_size x gradient_accumulation_steps x processes.
Under distributed_strategy fsdp the forward passes are collectives, so every process runs every
micro-batch (one with no item of a short batch trains a stand-in at zero weight) and every validation.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from functools import partial
from typing import Any

import numpy as np
import torch

from . import __version__
from .checkpoint import (
    CheckpointState,
    load_resume_point,
    prune_checkpoints,
    save_checkpoint,
    save_safetensors,
)
from .config import TrainConfig
from .data.sampler import EpochPlan, RunBatches, batch_seed, run_batches
from .distributed import BatchRandom, World, shard_bounds, strategy
from .errors import ConfigError, DivergedError, Interrupted, TrainError
from .experiment import ExperimentRecord
from .files import sha256_file
from .layout import CHECKPOINTS, FINAL_CHECKPOINT, FINAL_WEIGHTS
from .observers import (
    EtaEstimator,
    Observer,
    ProgressReporter,
    RunInfo,
    SampleWriter,
    StepStats,
    Stopwatch,
    TensorBoardLogger,
)
from .optim import build_optimizer, build_scheduler
from .outputs import prepare_output_dir, write_config_backup
from .quantization import frozen_weight_bytes
from .summary import Artifact, RunSummary
from .tasks import build_task

log = logging.getLogger("lora_trainer")


def ignore_sigterm(worker_id: int) -> None:
    """Data loader workers leave SIGTERM to the main process: a signal sent to the whole process group
    (Ctrl-C's kin, Slurm, `kill -- -PGID`) would otherwise kill them and turn the SIGTERM checkpoint into a
    crash. The loader still stops them, and they exit when the main process does."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """The global generators (dropout draws from torch's); the loss's draws are seeded per batch."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pick_device(cfg: TrainConfig, world: World | None = None) -> tuple[torch.device, torch.dtype]:
    """The device (this process's GPU: its local rank), and the dtype of the frozen base weights (LoRA
    weights always train in fp32)."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("device: cuda was asked for, but no CUDA GPU is visible")
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and cuda)
    device = torch.device("cuda", (world or World()).local_rank) if on_gpu else torch.device("cpu")
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if device.type == "cuda" and cfg.mixed_precision != "no":
        return device, torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
    return device, torch.float32


def default_observers(cfg: TrainConfig, shown: TrainConfig | None = None) -> list[Observer]:
    """Progress, TensorBoard, EXPERIMENT.md (recording `shown`, the user's config, when given) and samples."""
    observers = [
        ProgressReporter(cfg.logging_steps),
        TensorBoardLogger(cfg.logging_dir),
        ExperimentRecord(cfg, shown=shown),
    ]
    if cfg.validation_prompts:
        observers.append(SampleWriter(cfg.output_dir))
    return observers


class TrainingRecipe:
    def __init__(
        self,
        cfg: TrainConfig,
        observers: list[Observer] | None = None,
        stop: threading.Event | None = None,
        profile: bool = False,
        world: World | None = None,
        shown: TrainConfig | None = None,
    ):
        self.cfg = cfg
        self.shown = shown or cfg  # the config to record in config_backup.yaml: the user's, with s3:// URIs
        self.world = world or World.from_env()
        if observers is None:
            observers = default_observers(cfg) if self.world.is_main else []
        self.observers = observers
        self.stop = stop or threading.Event()  # set by the SIGTERM handler
        self.profile = profile
        self.summary = RunSummary()
        self.step = self.epoch = self.step_in_epoch = 0

    def run(self) -> RunSummary:
        try:
            self.setup()
            self.train()
            self.validate()
            self.finish()
        except TrainError as err:
            self.summary.error, self.summary.error_reason = str(err), err.reason
            if isinstance(err, Interrupted):
                self.summary.error = None
            raise
        except BaseException as err:
            self.summary.error, self.summary.error_reason = f"{type(err).__name__}: {err}", "Crashed"
            raise
        finally:
            self.cleanup()
        return self.summary

    # -- setup
    def setup(self) -> None:
        cfg, world = self.cfg, self.world
        self.device, weight_dtype = pick_device(cfg, world)
        world.start(self.device.type)
        if world.is_main:
            self.out = prepare_output_dir(cfg)
            write_config_backup(self.shown, self.out)
            self.summary.output_prepared = True
        self.task = build_task(cfg)
        # the dataset is validated before any model loads (and with auto_label, captioned first); the first
        # process of each node fills the node's caches (captions, features) before the others read them
        with world.local_main_first():
            report = self.task.prepare_data(labeling=partial(self._notify, "on_labeling"))
        self.summary.data_summary, self.summary.warnings = report.summary, list(report.warnings)
        seed_everything(cfg.seed)  # here, so the LoRA init depends on the seed alone, not on what ran before
        self.strategy = strategy(cfg.distributed_strategy, world)
        if self.strategy.name != cfg.distributed_strategy:
            log.info(
                "distributed_strategy %s: one process has nothing to shard; training as %s",
                cfg.distributed_strategy,
                self.strategy.name,
            )
        with world.local_main_first():
            self.task.load(self.device, weight_dtype, blocks_on_host=self.strategy.blocks_on_host)
            self.dataset = self.task.dataset()
        self.weights = self.task.item_weights()
        global_batch = cfg.batch_size * world.size
        self.plan = EpochPlan(self.task.item_groups(), global_batch, cfg.gradient_accumulation_steps)
        self.total_steps = self.plan.total_steps(cfg.epochs, cfg.max_train_steps)
        self.epochs = self.plan.epochs_needed(self.total_steps)
        groups = self.task.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        blocks = list(self.task.frozen_blocks())
        whole_mib = sum(frozen_weight_bytes(b) for b in blocks) / 2**20
        placed = self.strategy.place(blocks, self.params, self.device)
        if placed.sharded_blocks:
            log.info(
                "fsdp: %d blocks of the frozen base sharded over %d processes; their frozen weights take %.1f MiB "
                "in this process (%.1f MiB whole)",
                placed.sharded_blocks,
                world.size,
                sum(frozen_weight_bytes(b) for b in blocks) / 2**20,
                whole_mib,
            )
        if placed.whole_weights:
            log.info(
                "fsdp: %d quantized weights of those blocks do not split into %d equal slices of whole "
                "quantization blocks; they stay whole in every process",
                placed.whole_weights,
                world.size,
            )
        self.optimizer = build_optimizer(groups, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
        self.stopwatch = Stopwatch(torch.cuda.synchronize if self.profile and self.device.type == "cuda" else None)
        self.eta = EtaEstimator()
        if cfg.resume:
            self.resume(cfg.resume)
        self.summary.total_steps = self.total_steps
        self.task.train_mode()
        info = RunInfo(
            self.total_steps,
            self.step,
            self.epochs,
            str(self.device),
            sum(p.numel() for p in self.params),
            report.summary,
            report.warnings,
        )
        self._notify("on_start", info)

    def resume(self, resume: str) -> None:
        """The main process reads the checkpoint (on S3 runs only its node has it) and sends it to the others."""
        found = None
        if self.world.is_main:
            found, passed_over = load_resume_point(self.out, resume)
            for problem in passed_over:
                log.warning("resume: %s", problem)
        found = self.world.broadcast(found)
        if found is None:
            log.info("resume: latest found no complete checkpoint in %s; starting from step 0", self.cfg.output_dir)
            return
        ckpt, weights, state = found
        self.check_same_run(state.trainer)
        self.task.load_lora_state_dict({k: v.to(self.device) for k, v in weights.items()})
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        restore_rng(state.rng)
        t = state.trainer
        self.step, self.epoch, self.step_in_epoch = t["step"], t["epoch"], t["step_in_epoch"]
        s = self.summary
        s.losses = [tuple(x) for x in t["losses"]]
        s.samples, s.tokens, s.resumed_from = t["samples"], t["tokens"], self.step
        s.best_loss = min((loss for _, loss in s.losses), default=None)
        log.info("resumed from %s at step %d", ckpt.state_dir, self.step)

    def check_same_run(self, trainer: dict[str, Any]) -> None:
        """A checkpoint continues one run: the data plan and seed must be the ones it was made with."""
        now = self.plan_fingerprint()
        then = trainer.get("plan", now)
        diff = [f"{k} {then[k]} -> {now[k]}" for k in now if then.get(k) != now[k]]
        if diff:
            raise ConfigError(f"cannot resume: the checkpoint was made with a different data plan ({'; '.join(diff)})")

    def plan_fingerprint(self) -> dict[str, int]:
        """The global plan: a checkpoint resumes with any number of processes that keeps the global batch."""
        return {
            "items": self.plan.num_items,
            "batches_per_epoch": self.plan.batches_per_epoch,
            "batch_size": self.plan.batch_size,  # global: per-process batch_size x processes
            "gradient_accumulation_steps": self.plan.accumulation,
            "seed": self.cfg.seed,
        }

    # -- the loop
    def train(self) -> None:
        batches = iter(self.loader())
        start_batch = self.step_in_epoch * self.plan.accumulation
        plan = run_batches(self.plan, self.cfg.seed, self.epochs, self.epoch, start_batch)  # the global order
        try:
            for epoch in range(self.epoch, self.epochs):
                self.epoch = epoch
                for group in self.plan.step_groups()[self.step_in_epoch :]:
                    if self.step >= self.total_steps:
                        return
                    stats = self.train_step(batches, plan, group)
                    self.step_in_epoch += 1
                    self.after_step(stats)
                self.step_in_epoch = 0
        finally:
            del batches  # stops loader workers at once, also on errors

    def loader(self) -> torch.utils.data.DataLoader:
        """One loader for the rest of the run; its workers prefetch across epoch boundaries."""
        workers = self.num_workers()
        start_batch = self.step_in_epoch * self.plan.accumulation
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=RunBatches(
                self.plan,
                self.cfg.seed,
                self.epochs,
                self.epoch,
                start_batch,
                self.world,
                self.cfg.batch_size,
                stand_in=self.strategy.collective_forward,
            ),
            collate_fn=self.task.collate,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
            worker_init_fn=ignore_sigterm,
            # its own generator: a loader drawing its base seed from the global RNG (used by dropout)
            # would shift that stream whenever a resumed run starts part-way
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def num_workers(self) -> int:
        """num_workers, or by default none on CPU (no GPU to feed) and up to 8 on a GPU."""
        if self.cfg.num_workers is not None:
            return self.cfg.num_workers
        return 0 if self.device.type == "cpu" else min(8, os.cpu_count() or 1)

    def train_step(self, batches, plan, group: int) -> StepStats:
        started = time.perf_counter()
        loss_sum, samples, tokens = 0.0, 0, 0
        for _ in range(group):
            epoch, number, keys = next(plan)
            lo, hi = shard_bounds(len(keys), self.world, self.cfg.batch_size)
            idle = lo == hi  # no item of this short global batch is ours
            if idle and not self.strategy.collective_forward:
                continue
            if idle:  # the others' forward needs ours: the loader gave us the last item, to train at weight 0
                lo, share = hi - 1, 0.0
            else:
                share = self.weight(keys[lo:hi]) / self.weight(keys)  # our part of the global batch's mean loss
            with self.stopwatch.measure("data"):
                batch = next(batches)
            with self.stopwatch.measure("forward_backward"):
                draws = BatchRandom(
                    torch.Generator(self.device).manual_seed(batch_seed(self.cfg.seed, epoch, number)),
                    lo,
                    hi,
                    len(keys),
                )
                loss = self.task.loss(batch, draws)
                value = loss.item()
                scaled = loss * (share / group)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if idle:
                continue
            loss_sum += value * share / group
            n, t = self.task.batch_counts(batch)
            samples, tokens = samples + n, tokens + t
        loss_sum, samples, tokens = self.world.sum_floats(loss_sum, samples, tokens)
        if not math.isfinite(loss_sum):  # every process sees the summed loss: all stop at the same step
            raise DivergedError(
                f"loss became {loss_sum} at step {self.step + 1} (epoch {self.epoch + 1}); the run stopped. "
                f"Lower learning_rate (now {self.cfg.learning_rate:g}), keep max_grad_norm > 0, "
                "or train with mixed_precision bf16 or no"
            )
        with self.stopwatch.measure("optimizer"):
            self.sum_gradients()
            grad_norm = self.optimizer_step()
        self.step += 1
        seconds = time.perf_counter() - started
        return StepStats(
            step=self.step,
            total_steps=self.total_steps,
            epoch=self.epoch + 1,
            epochs=self.epochs,
            loss=loss_sum,
            learning_rate=self.scheduler.get_last_lr()[0],
            grad_norm=grad_norm,
            samples=int(samples),
            tokens=int(tokens),
            step_seconds=seconds,
            eta_seconds=self.eta.update(seconds, self.total_steps - self.step),
        )

    def weight(self, keys) -> float:
        return sum(self.weights[index] for index, _ in keys)

    def sum_gradients(self) -> None:
        """The gradient of the global batch: each process's (share-weighted) gradients summed over all."""
        if not self.world.distributed:
            return
        for p in self.params:
            if p.grad is None:  # this process had no item in the step, or the module got no gradient
                p.grad = torch.zeros_like(p)
        self.world.sum_([p.grad for p in self.params])

    def optimizer_step(self) -> float:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm or float("inf")  # inf: measure the norm, clip nothing
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def after_step(self, stats: StepStats) -> None:
        s = self.summary
        s.step, s.loss, s.samples, s.tokens = stats.step, stats.loss, s.samples + stats.samples, s.tokens + stats.tokens
        s.losses.append((stats.step, stats.loss))
        s.best_loss = stats.loss if s.best_loss is None else min(s.best_loss, stats.loss)
        self._notify("on_step", stats)
        every = self.cfg.validation_steps
        if every and self.step % every == 0 and self.step < self.total_steps:
            self.validate()
        save_steps = self.cfg.save_steps
        if self.world.any(self.stop.is_set()):  # SIGTERM to any process: all checkpoint at this one step
            self.save_checkpoint()
            raise Interrupted(f"stopped by SIGTERM at step {self.step}; checkpoint written")
        if save_steps and self.step % save_steps == 0 and self.step < self.total_steps:
            self.save_checkpoint()

    def validate(self) -> None:
        """Samples or held-out loss, on the main process (on every process when their forwards are
        collectives; the main one reports). Its own RNG fork: validation never shifts the training stream."""
        if not self.world.is_main and not self.strategy.collective_forward:
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.stopwatch.measure("validation"):
            result = self.task.validate(self.step)
        self.task.train_mode()
        if result is not None:
            self._notify("on_validation", result)

    # -- checkpoints and outputs
    def save_checkpoint(self) -> None:
        if self.step in self.summary.checkpoints or not self.world.is_main:
            return
        with self.stopwatch.measure("checkpoint"):
            state = CheckpointState(
                trainer={
                    "step": self.step,
                    "epoch": self.epoch,
                    "step_in_epoch": self.step_in_epoch,
                    "losses": self.summary.losses,
                    "samples": self.summary.samples,
                    "tokens": self.summary.tokens,
                    "total_steps": self.total_steps,
                    "plan": self.plan_fingerprint(),
                },
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                rng=capture_rng(),
                scaler=self.scaler.state_dict() if self.scaler else None,
            )
            ckpt = save_checkpoint(self.out, self.step, self.task.lora_state_dict(), self.weights_metadata(), state)
            prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        self.summary.checkpoints.append(self.step)
        self._notify("on_checkpoint", self.step, [ckpt.weights, ckpt.state_dir])

    def weights_metadata(self) -> dict[str, str]:
        cfg = self.cfg
        meta = {
            "format": "pt",
            "rank": str(cfg.lora_rank),
            "alpha": f"{cfg.network_alpha:g}",
            "base_model": cfg.base_model,
            "task_type": cfg.task_type,
            "train_text_encoder": str(cfg.train_text_encoder).lower(),
            "base_quantization": cfg.base_quantization,  # what the LoRA learned beside: merge notes read it
            "step": str(self.step),
            "lora_operator_version": __version__,
        }
        return {**meta, **self.task.weights_metadata()}

    def finish(self) -> None:
        """Final weights (by the main process); the main file is written last: its presence means a finished run."""
        if not self.world.is_main:
            return
        weights, meta = self.task.lora_state_dict(), self.weights_metadata()
        ckpt_final = self.out / CHECKPOINTS / FINAL_CHECKPOINT
        with self.stopwatch.measure("checkpoint"):
            save_safetensors(ckpt_final, weights, meta)
            extra = self.task.final_files(self.out, ckpt_final, weights, meta)
            save_safetensors(self.out / FINAL_WEIGHTS, weights, meta)
        fmt = self.task.weights_format
        for path, kind in [(self.out / FINAL_WEIGHTS, fmt), (ckpt_final, fmt), *extra]:
            self.summary.artifacts.append(Artifact(str(path), kind, sha256_file(path), self.step))

    def cleanup(self) -> None:
        """Observers hear how the run ended, also when it failed before on_start (e.g. a bad dataset)."""
        self.summary.ended = time.time()
        self.summary.timings = dict(getattr(self, "stopwatch", Stopwatch()).totals)
        self._notify("on_end", self.summary)

    def _notify(self, event: str, *args) -> None:
        for observer in self.observers:
            getattr(observer, event)(*args)
