"""Data-parallel training with torch.distributed: which process this is, and the few collectives a run needs.

Every process trains its shard of the same global batches (data/sampler.py) with a full copy of the model;
after the micro-batches of an optimizer step, the LoRA gradients are summed over the processes in one
all-reduce (LoRA gradients are megabytes: DDP's overlap of communication with the backward pass would buy
nothing, and one explicit reduction keeps gradient accumulation and several trained modules simple).
Each process weights its loss by its share of the global batch, so the sum is the gradient of the global
mean: N processes with batch b train exactly like one process with batch N*b.

How the model lives in the processes is the run's `distributed_strategy` (STRATEGIES): `ddp`, a whole copy in
every process, or `fsdp`, the frozen base's blocks sharded over the processes with FSDP2 (`fully_shard`), each
block gathered whole just for its forward and backward. Under fsdp the LoRA weights stay whole and
unsharded in every process (`ignored_params`): they are megabytes beside the base, and kept whole they are
reduced, clipped, stepped and saved exactly as under ddp, so the two strategies train the same weights and
write the same checkpoints, and either resumes the other.

Launched by torch's elastic launcher (`lora-train --nproc-per-node N`, or torchrun), which sets RANK,
WORLD_SIZE and LOCAL_RANK; a plain `lora-train` is a world of one, with no process group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

# how long a collective waits for the other processes: longer than the slowest step or cache fill between
# two collectives, short enough that the survivors of a dead process stop (and the group restarts) soon
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that writes outputs, checkpoints and records and serves the metrics."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The first process of its node: it fills the node's download and feature caches."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> World:
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    # -- the process group
    def start(self, device_type: str) -> None:
        """Joins the process group (NCCL between GPUs, gloo between CPUs); a world of one has none."""
        if self.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            torch.distributed.init_process_group(
                backend, rank=self.rank, world_size=self.size, timeout=COLLECTIVE_TIMEOUT
            )

    def stop(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # -- collectives (no-ops in a world of one)
    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sums tensors over the processes, in place, in one all-reduce of their concatenation."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum_floats(self, *values: float) -> list[float]:
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """Whether any process says so: every process then takes the same branch (stop, checkpoint)."""
        return bool(self.sum_floats(float(flag))[0]) if self.distributed else flag

    def broadcast(self, value: object) -> object:
        """The main process's value on every process (trusted: the processes of this run pickle to each other)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """The node's first process runs the block (filling a cache) before the others, which then find it full."""
        if not self.is_local_main:
            self.barrier()
        yield
        if self.is_local_main:
            self.barrier()


class Strategy(Protocol):
    """How the model is spread over the processes of a run."""

    name: ClassVar[str]
    # whether the model's forward passes are collectives: every process must then run each of them (a process
    # with no item of a short batch runs one at zero weight, and validation runs everywhere)
    collective_forward: ClassVar[bool]
    # whether the task loads the frozen blocks in host memory (Task.load's blocks_on_host) for place() to move
    # to the device: a sharded base bigger than one GPU must never be whole on one
    blocks_on_host: ClassVar[bool]

    def place(
        self, blocks: Iterable[torch.nn.Module], trainable: Iterable[torch.nn.Parameter], device: torch.device
    ) -> Placement:
        """Puts the loaded model's frozen `blocks` in place on `device`, `trainable` (the LoRA weights) whole."""


@dataclass(frozen=True)
class Placement:
    sharded_blocks: int = 0
    whole_weights: int = 0  # frozen weights of those blocks FSDP2 cannot split evenly, kept whole in every process


@dataclass(frozen=True)
class DataParallel:
    """A whole copy of the model in every process; LoRA gradients summed by World.sum_."""

    world: World
    name: ClassVar[str] = "ddp"
    collective_forward: ClassVar[bool] = False
    blocks_on_host: ClassVar[bool] = False

    def place(self, blocks, trainable, device) -> Placement:
        return Placement()


@dataclass(frozen=True)
class ShardedBase:
    """The frozen base's blocks sharded over the processes (FSDP2); LoRA weights whole, as under ddp.

    Each block is one FSDP unit: its frozen weights are split over the processes, all-gathered before its
    forward (and again for the backward) and freed after. The frozen weights have no gradients, so FSDP
    reduces nothing; the LoRA weights are `ignored_params`, plain tensors whose gradients World.sum_ adds up
    as under ddp: no gradient is reduced twice, and the loss scaling is ddp's. What lies outside the blocks
    (embeddings, output layer, the denoiser's input and output layers) stays whole in every process."""

    world: World
    name: ClassVar[str] = "fsdp"
    collective_forward: ClassVar[bool] = True
    blocks_on_host: ClassVar[bool] = True

    def place(self, blocks, trainable, device) -> Placement:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        blocks, trainable = list(blocks), list(trainable)
        if not blocks:
            raise ValueError("distributed_strategy fsdp: the model has no blocks to shard")
        mesh = init_device_mesh(device.type, (self.world.size,))
        whole = {p for block in blocks for p in block.parameters() if not self.splits(p)}
        keep = set(trainable) | whole
        for block in blocks:
            # fully_shard moves the block from the host to the device, keeps this process's slice and frees
            # the rest; reshard_after_forward: the block's gathered weights are freed after the forward and
            # gathered again for the backward, so at most a block or two is ever whole on a device
            fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=keep)
        for param in (*trainable, *whole):  # what FSDP does not manage: the LoRA weights, the weights kept whole
            move(param, device)
        return Placement(len(blocks), len(whole))

    def splits(self, param: torch.nn.Parameter) -> bool:
        """Whether FSDP2 can shard a weight: a plain tensor always (FSDP2 pads the last shard); a quantized one
        (a tensor subclass) only if it implements FSDP2's all-gather extension (torchao's NF4Tensor does), and
        then only into equal row slices of whole quantization blocks."""
        data = param.data
        if type(data) is torch.Tensor:
            return True
        if not hasattr(data, "fsdp_pre_all_gather") or data.dim() == 0 or data.size(0) % self.world.size:
            return False
        try:
            torch.chunk(data, self.world.size, dim=0)
        except Exception:  # noqa: BLE001 - the subclass's own split refuses (blocks straddling the slices)
            return False
        return True


def to_device_except(module: torch.nn.Module, device: torch.device, blocks: Iterable[torch.nn.Module]) -> None:
    """Module.to(device) for everything of `module` outside `blocks` (Task.load's blocks_on_host)."""
    inside = {id(m) for block in blocks for m in block.modules()}
    for sub in module.modules():
        if id(sub) not in inside:
            sub._apply(lambda t: t.to(device), recurse=False)


def move(param: torch.nn.Parameter, device: torch.device) -> None:
    """Moves a parameter to `device` in place, keeping its identity (the optimizer's and peft's references)."""
    if param.device == device:
        return
    with torch.no_grad():
        moved = param.data.to(device)
        if torch._has_compatible_shallow_copy_type(param.data, moved):  # as Module.to decides
            param.data = moved
        else:  # a tensor subclass (a quantized weight) cannot be set as .data: swapped whole, as FSDP2 does
            torch.utils.swap_tensors(param, torch.nn.Parameter(moved, requires_grad=param.requires_grad))


STRATEGIES: dict[str, type[DataParallel] | type[ShardedBase]] = {"ddp": DataParallel, "fsdp": ShardedBase}


def strategy(name: str, world: World) -> Strategy:
    """The strategy `distributed_strategy` names; a world of one has nothing to shard and runs as ddp."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown distributed_strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](world) if world.distributed else DataParallel(world)


def shard_bounds(total: int, world: World, per_process: int) -> tuple[int, int]:
    """[lo, hi) of a global batch of `total` items that this process trains: consecutive slices of
    `per_process`; a short last batch leaves the last processes less or nothing."""
    lo = min(world.rank * per_process, total)
    return lo, min(lo + per_process, total)


class BatchRandom:
    """The random draws of one micro-batch, made for its whole global batch from the run's generator and
    then cut to this process's items [lo, hi): an item gets the same noise whichever process trains it,
    and a world of one draws exactly as a single batch would."""

    def __init__(self, generator: torch.Generator, lo: int = 0, hi: int | None = None, total: int | None = None):
        self.generator, self.lo = generator, lo
        self.total = total if total is not None else (hi or 0)
        self.hi = hi if hi is not None else self.total

    @classmethod
    def whole(cls, generator: torch.Generator, batch: int) -> BatchRandom:
        return cls(generator, 0, batch, batch)

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def randn(self, item_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(hi - lo, *item_shape) standard normal."""
        draw = torch.randn((self.total, *item_shape), generator=self.generator, device=self.device, dtype=dtype)
        return draw[self.lo : self.hi]

    def randint(self, low: int, high: int) -> torch.Tensor:
        draw = torch.randint(low, high, (self.total,), generator=self.generator, device=self.device)
        return draw[self.lo : self.hi]

    def cut(self, draw: torch.Tensor) -> torch.Tensor:
        """This process's rows of a draw a library made for the global batch (with this generator)."""
        return draw[self.lo : self.hi]
