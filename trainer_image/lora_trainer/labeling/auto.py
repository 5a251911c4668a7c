"""auto_label: a training run captions the images that have no caption before it validates its data.

Only what is missing is captioned; existing captions are kept as they are. The result is a metadata.csv
holding every caption (the dataset's own ones and the new ones), written atomically:

- into the dataset folder (metadata_path, or <train_data_dir>/metadata.csv), as lora-scripts does, so the
  next run and lora-label find the captions there;
- into <output_dir>/metadata.csv when the dataset folder is read-only (a read-only volume, a shared
  dataset, `dataset_read_only`, or the local copy of an s3:// dataset, which is a download cache; the
  captions then reach S3 with the outputs). A restarted run reuses the captions of that copy, so it trains
  on the same text.

Either way the run then reads its captions from that file, and EXPERIMENT.md names it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..data.images import ImageFolderScan, read_metadata_csv, scan_image_folder
from ..errors import DatasetError, OutputError
from ..layout import CAPTIONS
from .core import caption_images, relative_name, write_metadata_csv

log = logging.getLogger("lora_trainer")


def dataset_captions_path(cfg) -> Path:
    return Path(cfg.metadata_path) if cfg.metadata_path else Path(cfg.train_data_dir) / "metadata.csv"


def output_captions_path(cfg) -> Path:
    return Path(cfg.output_dir) / CAPTIONS


def scan_captioned_folder(cfg, captioner=None, progress: Callable[[int, int], None] | None = None) -> ImageFolderScan:
    """scan_image_folder with the config's caption settings; with auto_label, captions what is missing first
    (telling `progress(done, total)` as it goes)."""

    def scan(metadata_path, allow_missing=False):
        return scan_image_folder(
            cfg.train_data_dir,
            metadata_path,
            cfg.caption_extension,
            cfg.image_column,
            cfg.caption_column,
            allow_missing_captions=allow_missing,
        )

    if not cfg.auto_label:
        return scan(cfg.metadata_path)
    first = scan(cfg.metadata_path, allow_missing=True)
    missing = [r.path for r in first.records if not r.caption]
    if not missing:
        return first
    folder = Path(cfg.train_data_dir)
    rows = {relative_name(r.path, folder): r.caption for r in first.records if r.caption}
    earlier = previous_output_captions(cfg)
    reused = {p for p in missing if earlier.get(relative_name(p, folder))}
    rows.update({relative_name(p, folder): earlier[relative_name(p, folder)] for p in reused})
    todo = [p for p in missing if p not in reused]
    if todo:
        rows.update(caption_missing(cfg, todo, folder, captioner, progress))
    target = write_captions(cfg, rows)
    where = f"output_dir/{CAPTIONS}" if target == output_captions_path(cfg) else str(target)
    source = (
        f"{first.caption_source} + auto_label: {len(todo)} captioned by {cfg.label_model}"
        + (f", {len(reused)} from an earlier attempt" if reused else "")
        + f" (in {where})"
    )
    return dataclasses.replace(scan(str(target)), caption_source=source)


def previous_output_captions(cfg) -> dict[str, str]:
    """Captions an earlier attempt of this run wrote into output_dir (the dataset folder was read-only)."""
    path = output_captions_path(cfg)
    if not path.is_file():
        return {}
    return {k: v for k, v in read_metadata_csv(path, cfg.image_column, cfg.caption_column).items() if v}


def caption_missing(
    cfg, paths: list[Path], folder: Path, captioner=None, progress: Callable[[int, int], None] | None = None
) -> dict[str, str]:
    from .captioner import Captioner

    log.info("auto_label: captioning %d image(s) with %s", len(paths), cfg.label_model)
    if progress:
        progress(0, len(paths))  # before the model loads, which may take longer than captioning
    model = captioner or Captioner(cfg.label_model)
    captions, failed = caption_images(
        paths, model, cfg.label_batch_size, cfg.caption_prefix, cfg.caption_suffix, progress
    )
    if failed:
        listed = "; ".join(f"{relative_name(p, folder)}: {why}" for p, why in failed[:5])
        raise DatasetError(f"auto_label could not caption {len(failed)} image(s): {listed}")
    return {relative_name(p, folder): text for p, text in captions.items()}


def writable(path: Path) -> bool:
    """access(2) answers for read-only mounts (EROFS) even for root, and for permissions otherwise."""
    folder_ok = os.access(path.parent, os.W_OK | os.X_OK)
    return folder_ok and (not path.exists() or os.access(path, os.W_OK))


def write_captions(cfg, rows: dict[str, str]) -> Path:
    """Into the dataset folder if it can be written, else into output_dir (see the module docstring)."""
    target, fallback = dataset_captions_path(cfg), output_captions_path(cfg)
    if cfg.dataset_read_only:
        log.info("auto_label: the dataset is not written (dataset_read_only); the captions go to %s", fallback)
    elif writable(target):
        try:
            return write_metadata_csv(target, rows, cfg.image_column, cfg.caption_column)
        except OutputError as err:
            log.warning("auto_label: %s", err)
    else:
        log.warning("auto_label: %s cannot be written; the captions go to %s", target, fallback)
    return write_metadata_csv(fallback, rows, cfg.image_column, cfg.caption_column)
