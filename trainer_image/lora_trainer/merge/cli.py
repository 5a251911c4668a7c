"""lora-merge: merge LoRAs into their base model, or convert a LoRA file between formats.

    lora-merge merge --base MODEL --lora a.safetensors:0.8 --lora b.safetensors:0.5 --output OUT
    lora-merge convert --to kohya|diffusers IN OUT [--unet-names ldm --base-config MODEL]

MODEL is a diffusers folder, a single-file .safetensors checkpoint (with --base-config), a transformers
folder (LLMs, with peft adapters as --lora) or preset:<name>. OUT is a folder, or for Stable Diffusion 1.x
a .safetensors file in the original checkpoint layout that A1111 and ComfyUI load.
Exit codes as lora-train: 0 ok, 2 bad arguments, 4 a model or LoRA that cannot be used, 7 write failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import ConfigError, ExitCode, TrainError

log = logging.getLogger("lora_trainer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lora-merge", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge LoRAs into the base model and save it")
    merge.add_argument("--base", required=True, help="base model: folder, .safetensors file or preset:<name>")
    merge.add_argument("--base-config", help="for a single-file base: a diffusers folder with the configs")
    merge.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA file (or peft adapter folder) and its scale, default 1 (repeatable)",
    )
    merge.add_argument("--output", "-o", required=True, help="output folder, or a .safetensors file (SD 1.x)")
    merge.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="weights as saved")

    convert = sub.add_parser("convert", help="convert a LoRA file: diffusers <-> kohya (A1111/ComfyUI)")
    convert.add_argument("--to", required=True, choices=("kohya", "diffusers"), help="output format")
    convert.add_argument("input", help="LoRA .safetensors file")
    convert.add_argument("output", help="output .safetensors file")
    convert.add_argument(
        "--unet-names",
        choices=("diffusers", "ldm"),
        default="diffusers",
        help="kohya UNet names: diffusers blocks (kohya's SD 1.x/2.x files, default) or LDM "
        "blocks (input_blocks_..., kohya's SDXL files); ldm needs --base-config",
    )
    convert.add_argument(
        "--base-config",
        help="diffusers model folder (or preset:<name>) for its UNet config; needed to read or write LDM-spelled names",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    return parser.parse_args(argv)


def unet_config(base_config: str | None) -> dict | None:
    if not base_config:
        return None
    from diffusers import UNet2DConditionModel

    from .models import resolve_base

    try:
        return dict(UNet2DConditionModel.load_config(str(resolve_base(base_config)), subfolder="unet"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--base-config {base_config}: no UNet config there ({err})") from None


def convert(args: argparse.Namespace) -> Path:
    from ..formats import read_lora, write_lora

    config = unet_config(args.base_config)
    if args.unet_names == "ldm" and config is None:
        raise ConfigError("--unet-names ldm needs --base-config: the LDM block numbers depend on the UNet layout")
    source, target = Path(args.input), Path(args.output)
    if target.resolve() == source.resolve():
        raise ConfigError("convert writes a new file; the output must differ from the input")
    lora = read_lora(source, config)
    if lora.format == "peft":
        raise ConfigError(f"{source} is a peft (LLM) adapter; kohya and diffusers formats hold SD LoRAs")
    out = write_lora(target, lora, args.to, config if args.unet_names == "ldm" else None)
    log.info("%s (%s) -> %s (%s, %d modules)", source, lora.format, out, args.to, len(lora.loras))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ..logs import setup_logging

    setup_logging(args.quiet)
    try:
        if args.command == "convert":
            print(convert(args))
            return ExitCode.OK
        from .models import merge, parse_lora_spec

        specs = [parse_lora_spec(text) for text in args.lora]
        if not specs:
            log.info("no --lora given: converting the base model only")
        print(merge(args.base, specs, Path(args.output), args.dtype, args.base_config))
        return ExitCode.OK
    except TrainError as err:
        log.error("%s (exit %d, %s)", err, err.exit_code, err.reason)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
