"""lora-label: caption a folder of images into metadata.csv (columns file_name,text).

    lora-label --input DIR [--output DIR/metadata.csv] [--model Salesforce/blip-image-captioning-base]
               [--trigger-word sks | --prefix TEXT] [--suffix TEXT] [--batch-size 8] [--overwrite]
    lora-label --input DIR --config train.yaml     # label_model, caption_prefix/suffix, label_batch_size

Images that already have a caption (metadata.csv or .txt beside them) keep it unless --overwrite.
Unreadable images are listed and skipped. Exit codes: 0 written (skipped images are listed), 2 bad
arguments or config, 3 no usable image, 4 the captioning model cannot be loaded.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ExitCode, TrainError
from .captioner import DEFAULT_LABEL_MODEL

log = logging.getLogger("lora_trainer")

# trainer config keys lora-label reads from --config (the same keys auto_label uses)
CONFIG_KEYS = {
    "label_model": "model",
    "caption_prefix": "prefix",
    "caption_suffix": "suffix",
    "label_batch_size": "batch_size",
    "caption_extension": "caption_extension",
    "image_column": "image_column",
    "caption_column": "caption_column",
}
DEFAULTS = {
    "model": DEFAULT_LABEL_MODEL,
    "prefix": "",
    "suffix": "",
    "batch_size": 8,
    "caption_extension": ".txt",
    "image_column": "file_name",
    "caption_column": "text",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lora-label", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", "-i", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--output", "-o", help="captions CSV to write (default: <input>/metadata.csv)")
    parser.add_argument(
        "--config",
        "-c",
        help="a lora-train config: label_model, caption_prefix, caption_suffix, label_batch_size (flags override it)",
    )
    parser.add_argument(
        "--model",
        "-m",
        help=f"captioning model: hub id, local folder or preset:tiny-blip (default {DEFAULT_LABEL_MODEL})",
    )
    parser.add_argument(
        "--prefix",
        "--trigger-word",
        dest="prefix",
        help="put before every new caption, comma-separated: 'sks' -> 'sks, a photo of ...'",
    )
    parser.add_argument("--suffix", help="put after every new caption, comma-separated")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default 8)")
    parser.add_argument("--overwrite", action="store_true", help="caption every image, replacing existing captions")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="longest caption, in tokens (default 40)")
    parser.add_argument("--beams", type=int, default=1, help="beam search width (default 1: greedy)")
    parser.add_argument("--prompt", help="text the caption starts from (BLIP: 'a photography of'); VLMs need one")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    return parser.parse_args(argv)


def settings_from_config(path: str | None) -> dict[str, Any]:
    """The labeling keys of a lora-train config (flat YAML or LoRATrainingJob manifest), aliases resolved."""
    if not path:
        return {}
    from ..config import canonical_keys, config_from_manifest, is_manifest, read_yaml

    doc = read_yaml(path)
    raw = config_from_manifest(doc, source=path) if is_manifest(doc) else doc
    values, problems = canonical_keys(raw)
    if problems:
        raise ConfigError(f"{path} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))
    return {CONFIG_KEYS[k]: v for k, v in values.items() if k in CONFIG_KEYS and v is not None}


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    settings = {**DEFAULTS, **settings_from_config(args.config)}
    for key in ("model", "prefix", "suffix", "batch_size"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if not isinstance(settings["batch_size"], int) or settings["batch_size"] < 1:
        raise ConfigError(f"--batch-size must be a whole number >= 1, got {settings['batch_size']!r}")
    for key in ("max_new_tokens", "beams"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1")
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ..logs import setup_logging

    setup_logging(args.quiet)
    try:
        from .captioner import Captioner
        from .core import label_folder

        settings = resolve(args)
        folder = Path(args.input)
        output = Path(args.output) if args.output else folder / "metadata.csv"
        model = Captioner(settings["model"], args.device, args.max_new_tokens, args.beams, args.prompt)
        report = label_folder(
            folder,
            output,
            model,
            overwrite=args.overwrite,
            batch_size=settings["batch_size"],
            prefix=settings["prefix"],
            suffix=settings["suffix"],
            caption_extension=settings["caption_extension"],
            image_column=settings["image_column"],
            caption_column=settings["caption_column"],
        )
    except TrainError as err:
        log.error("%s (exit %d, %s)", err, err.exit_code, err.reason)
        return err.exit_code
    for line in report.lines()[1:]:
        log.warning(line.strip())
    print(report.lines()[0])
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
