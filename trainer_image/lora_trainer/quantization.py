"""Quantized frozen bases (`base_quantization`): one backend per mode, the field's libraries behind one interface.

- nf4: QLoRA's format, bitsandbytes 4-bit NormalFloat with double quantization (the blocks' scales are
  quantized too), through transformers' or diffusers' `BitsAndBytesConfig`, as peft's QLoRA path loads it.
- int8, fp8: torchao's weight-only formats (`Int8WeightOnlyConfig`, `Float8WeightOnlyConfig`, per-row scales)
  through `TorchAoConfig`. torchao serves 8 bits better than bitsandbytes' LLM.int8 here: it runs on CPU and
  GPU alike, and peft merges into it.
- nf4 under distributed_strategy fsdp: torchao's `NF4Tensor` (the same NormalFloat blocks of 64, their scales
  quantized in blocks of 256), what torchtune's QLoRA shards: it implements FSDP2's all-gather extension, so
  each process stores its slice and the gathered block computes as the whole one. bitsandbytes' 4-bit weights
  do not (split, they lose their quantization state and compute garbage), nor do torchao's int8/fp8 tensors,
  so fsdp with those is refused (config.validate).

The base is quantized while it loads (`from_pretrained(quantization_config=...)`), so its full-precision
weights never reach the device. peft wraps the quantized layers with its own bitsandbytes and torchao LoRA
layers; LoRA weights train in fp32 and the files they are saved in do not change. Whether a backend runs on
the run's device is asked before anything loads (`QuantizedBase.problem`): the library's own environment
check, then one quantized layer's forward and backward on that device.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from importlib import metadata
from types import MethodType
from typing import Any, Protocol

import torch

MODES = ("none", "int8", "fp8", "nf4")  # config.schema.QUANTIZATION_MODES: the config layer is torch-free


class Backend(Protocol):
    package: str  # the pip package that quantizes
    bits: int  # bits per stored weight, before the scales
    summary: str  # what the mode is, for the refusal message

    def config(self, library: str, compute_dtype: torch.dtype) -> Any:
        """The quantization config of `library` ("transformers" or "diffusers") for from_pretrained."""

    def probe(self, device: torch.device, dtype: torch.dtype) -> None:
        """Quantizes one small layer on `device` and runs its forward and backward; raises if it cannot."""


@dataclass(frozen=True)
class BitsAndBytesNf4:
    package: str = "bitsandbytes"
    bits: int = 4
    summary: str = "bitsandbytes 4-bit NormalFloat with double quantization"

    def config(self, library: str, compute_dtype: torch.dtype) -> Any:
        return importlib.import_module(library).BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )

    def probe(self, device: torch.device, dtype: torch.dtype) -> None:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        _forward_backward(layer.to(device), device, dtype)  # Params4bit quantizes on the move to the device


@dataclass(frozen=True)
class TorchAoWeightOnly:
    config_name: str  # a torchao.quantization config class
    summary: str
    package: str = "torchao"
    bits: int = 8

    def config(self, library: str, compute_dtype: torch.dtype) -> Any:
        from torchao import quantization

        return importlib.import_module(library).TorchAoConfig(getattr(quantization, self.config_name)())

    def probe(self, device: torch.device, dtype: torch.dtype) -> None:
        from torchao import quantization

        layer = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False, device=device, dtype=dtype))
        quantization.quantize_(layer, getattr(quantization, self.config_name)())
        _forward_backward(layer, device, dtype)


@dataclass(frozen=True)
class TorchAoNf4:
    """torchao's NF4Tensor for every Linear weight made of whole scale blocks (64 x 256 values); smaller
    weights (a few embedding and modulation layers of image models) stay in full precision."""

    package: str = "torchao"
    bits: int = 4
    summary: str = "torchao 4-bit NormalFloat (NF4Tensor), scales quantized in blocks of 256, shardable by FSDP2"

    def config(self, library: str, compute_dtype: torch.dtype) -> Any:
        return importlib.import_module(library).TorchAoConfig(nf4_config_type()())

    def probe(self, device: torch.device, dtype: torch.dtype) -> None:
        from torchao.quantization import quantize_

        layer = torch.nn.Sequential(torch.nn.Linear(64, 512, bias=False, device=device, dtype=dtype))
        quantize_(layer, nf4_config_type()())
        torch.chunk(layer[0].weight, 2)  # FSDP2's split into shards: the reason for this backend
        _forward_backward(layer, device, dtype)


@functools.cache
def nf4_config_type() -> type:
    """The torchao config (registered with quantize_ on first use, not at import) that TorchAoConfig applies to
    each Linear as it loads."""
    from torchao.core.config import AOBaseConfig
    from torchao.quantization import to_nf4
    from torchao.quantization.transform_module import register_quantize_module_handler

    @dataclass(frozen=True)
    class Nf4WholeBlocks(AOBaseConfig):
        block_size: int = 64  # values per scale (QLoRA's)
        scaler_block_size: int = 256  # scales per second-level scale

    @register_quantize_module_handler(Nf4WholeBlocks)
    def quantize(module: torch.nn.Module, config: Nf4WholeBlocks) -> torch.nn.Module:
        if module.weight.numel() % (config.block_size * config.scaler_block_size) == 0:
            nf4 = to_nf4(module.weight.detach(), config.block_size, config.scaler_block_size)
            module.weight = torch.nn.Parameter(nf4, requires_grad=False)
        return module

    return Nf4WholeBlocks


def _forward_backward(layer: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    x = torch.randn(4, 64, device=device, dtype=dtype, requires_grad=True)
    layer(x).float().sum().backward()


BACKENDS: dict[str, Backend] = {
    "nf4": BitsAndBytesNf4(),
    "int8": TorchAoWeightOnly("Int8WeightOnlyConfig", "torchao int8 weight-only, per-row scales"),
    "fp8": TorchAoWeightOnly("Float8WeightOnlyConfig", "torchao float8 (e4m3) weight-only, per-row scales"),
}
SHARDED_BACKENDS: dict[str, Backend] = {"nf4": TorchAoNf4()}  # under distributed_strategy fsdp


def backend(mode: str, strategy: str = "ddp") -> Backend | None:
    """The backend of a base_quantization mode under a distributed_strategy; None for none. The strategy, not
    the process count, chooses: a config trains the same format at any world size, so its checkpoints move."""
    if mode == "none":
        return None
    table = SHARDED_BACKENDS if strategy == "fsdp" else BACKENDS
    if mode not in table:
        raise KeyError(
            f"base_quantization {mode!r} under distributed_strategy {strategy} is not one of {sorted(table)}"
        )
    return table[mode]


def load_kwargs(mode: str, library: str, compute_dtype: torch.dtype, strategy: str = "ddp") -> dict[str, Any]:
    """from_pretrained's extra arguments that quantize the loaded weights ({} for none)."""
    chosen = backend(mode, strategy)
    return {} if chosen is None else {"quantization_config": chosen.config(library, compute_dtype)}


@dataclass(frozen=True)
class QuantizedBase:
    """A run's need to load a base through `library` quantized as `mode`, on the configured device
    (compat.Need: checked before anything downloads or loads)."""

    mode: str
    library: str  # transformers (LLMs, text encoders) or diffusers (UNets, transformers of image models)
    device: str  # the config's device: auto, cpu or cuda
    strategy: str = "ddp"  # the config's distributed_strategy

    def problem(self) -> str | None:
        chosen = backend(self.mode, self.strategy)
        if chosen is None:
            return None
        where = f"base_quantization: {self.mode} ({chosen.summary})"
        if importlib.util.find_spec(chosen.package) is None:
            return (
                f"{where} needs the {chosen.package} package, which is not installed (scripts/setup.sh installs "
                f"the tested set; or `pip install {chosen.package}`)"
            )
        device = torch.device("cuda" if self.device == "cuda" or (self.device == "auto" and _cuda()) else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            _library_accepts(chosen.config(self.library, dtype), self.library, dtype)
            chosen.probe(device, dtype)
        except Exception as err:  # noqa: BLE001 - any failure of the library on this device is the answer
            first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
            return (
                f"{where} cannot run on {device.type} with {chosen.package} {_version(chosen.package)} and "
                f"{self.library} {_version(self.library)}: {first}. Use a device it supports (nf4 of a "
                "text-to-image base needs a CUDA GPU; int8 and fp8 also run on CPU) or base_quantization: none"
            )
        return None


def _library_accepts(config: Any, library: str, dtype: torch.dtype) -> None:
    """The loading library's own environment check for this quantization (what from_pretrained runs first)."""
    if library == "diffusers":
        from diffusers.quantizers import DiffusersAutoQuantizer

        DiffusersAutoQuantizer.from_config(config).validate_environment(torch_dtype=dtype, device_map=None)
    else:
        from transformers.quantizers import AutoHfQuantizer

        AutoHfQuantizer.from_config(config).validate_environment(dtype=dtype, device_map=None)


def _cuda() -> bool:
    return torch.cuda.is_available()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(not installed)"


class FrozenQuantizedLinear(torch.autograd.Function):
    """x W^T + b for a frozen quantized W, keeping only W (as stored) for the backward pass.

    torchao's weight-only tensors compute a linear by dequantizing W in `__torch_function__`, above autograd,
    so autograd kept every layer's full-precision copy until the backward pass: an int8 base held as much as
    an fp32 one while training (benchmarks/bench_llm.py --arch wide). Here the forward runs with autograd
    off and the backward dequantizes W again, one layer at a time, as bitsandbytes' 4-bit matmul does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ dequantized(weight).to(grad.dtype), None, None


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A torchao weight in full precision (NF4Tensor names it get_original_weight; its dequantize is static)."""
    original = getattr(weight, "get_original_weight", None)
    return original() if original is not None else weight.dequantize()


def _frozen_quantized_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.bias is not None and self.bias.requires_grad:  # a trained bias: torchao's own path gives it a gradient
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return FrozenQuantizedLinear.apply(x, self.weight, self.bias)


def keep_quantized_for_backward(model: torch.nn.Module) -> None:
    """Routes the frozen torchao-quantized Linears of a loaded model through FrozenQuantizedLinear (peft's LoRA
    layers call them as their base layer). bitsandbytes' layers need nothing."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and type(module.weight).__module__.startswith("torchao"):
            module.forward = MethodType(_frozen_quantized_forward, module)


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) weight occupies: torchao's tensor subclasses hold their data and scales as
    inner tensors; a bitsandbytes 4-bit weight keeps its block scales (themselves quantized) beside the data."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()  # a sharded DTensor names its local shard (and its mesh)
        return sum(stored_bytes(inner) for name in names if torch.is_tensor(inner := getattr(tensor, name)))
    own = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is None:
        return own
    return own + sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values() if torch.is_tensor(v))


def frozen_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the frozen (non-trainable) parameters of a module, quantized ones as they are stored."""
    return sum(stored_bytes(p) for p in module.parameters() if not p.requires_grad)
