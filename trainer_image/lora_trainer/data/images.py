"""Image folders with captions: metadata.csv (file_name,text) or .txt files beside the images.

`scan_image_folder` validates everything up front (missing files, unreadable images, missing captions)
and lists every problem at once, so a bad dataset fails before any model is loaded.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
MAX_LISTED = 10


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str


@dataclass(frozen=True)
class ImageFolderScan:
    records: list[ImageRecord]
    caption_source: str  # "metadata.csv", ".txt files"
    sizes: list[tuple[int, int]]  # (width, height) per record


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_metadata_csv(path: Path, image_column: str, caption_column: str) -> dict[str, str]:
    """file_name -> caption. Raises DatasetError naming the file, line and column on any problem."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in (image_column, caption_column) if c not in columns]
            if missing:
                raise DatasetError(
                    f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'no header'} "
                    f"(expected a header line like: {image_column},{caption_column})"
                )
            captions: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                name = (row.get(image_column) or "").strip()
                if not name:
                    raise DatasetError(f"{path}:{line}: empty {image_column}")
                if name in captions:  # which caption was meant? never drop one silently
                    raise DatasetError(f"{path}:{line}: {name} is listed a second time; give each image one row")
                captions[name] = (row.get(caption_column) or "").strip()
            return captions
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{path} cannot be read: {err}") from None


EXIF_ORIENTATION = 0x0112
ROTATED = {5, 6, 7, 8}  # orientations that swap width and height


def check_image(path: Path) -> tuple[int, int] | str:
    """(width, height) as load_image will see it (EXIF rotation applied), or why it cannot be used."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:  # verify() leaves the file unusable; size needs a fresh open
            image.load()
            w, h = image.size
            return (h, w) if image.getexif().get(EXIF_ORIENTATION) in ROTATED else (w, h)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"  # a decompression bomb: more pixels than Pillow decodes safely


def scan_image_folder(
    folder: str | Path,
    metadata_path: str | None = None,
    caption_extension: str = ".txt",
    image_column: str = "file_name",
    caption_column: str = "text",
    allow_missing_captions: bool = False,
) -> ImageFolderScan:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(
            f"train_data_dir {folder} is not a folder" if folder.exists() else f"train_data_dir {folder} does not exist"
        )
    csv_path = Path(metadata_path) if metadata_path else folder / "metadata.csv"
    if metadata_path and not csv_path.is_file():
        raise DatasetError(f"metadata_path {csv_path} does not exist")
    if csv_path.is_file():
        captions = read_metadata_csv(csv_path, image_column, caption_column)
        candidates = [folder / name for name in captions]
        escaping = [n for n in captions if not _inside(folder / n, folder)]
        if escaping:
            raise DatasetError(f"{csv_path}: file_name outside train_data_dir: {_short_list(escaping)}")
        missing = [n for n, p in zip(captions, candidates) if not p.is_file()]
        if missing:
            raise DatasetError(f"{csv_path} lists {len(missing)} image(s) that do not exist: {_short_list(missing)}")
        records = [ImageRecord(p, captions[n]) for n, p in zip(captions, candidates)]
        source = csv_path.name
    else:
        images = list_images(folder)
        escaping = [
            p.name
            for p in images
            for f in (p, p.with_suffix(caption_extension))
            if (f.exists() or f.is_symlink()) and not _inside(f, folder)
        ]
        if escaping:
            raise DatasetError(f"train_data_dir {folder}: symbolic links lead outside it: {_short_list(escaping)}")
        records = [ImageRecord(p, _read_caption_file(p.with_suffix(caption_extension))) for p in images]
        source = f"{caption_extension} files"
    if not records:
        raise DatasetError(f"train_data_dir {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    uncaptioned = [r.path.name for r in records if not r.caption]
    if uncaptioned and not allow_missing_captions:
        raise DatasetError(
            f"{len(uncaptioned)} of {len(records)} image(s) have no caption in {source}: "
            f"{_short_list(uncaptioned)} (add captions, or set auto_label: true to caption them)"
        )
    checks = [check_image(r.path) for r in records]
    bad = [f"{r.path.name} ({c})" for r, c in zip(records, checks) if isinstance(c, str)]
    if bad:
        raise DatasetError(f"{len(bad)} image(s) cannot be read: {_short_list(bad)}")
    return ImageFolderScan(records, source, [c for c in checks if not isinstance(c, str)])


def _read_caption_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"caption file {path} cannot be read: {err}") from None


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _short_list(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        ImageOps.exif_transpose(image, in_place=True)  # a copy per image otherwise
        return image.convert("RGB")


def bucket_sizes(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """(width, height) buckets as kohya builds them: multiples of `step` within [min, max] whose area
    is at most resolution**2, the largest height for each width; square first."""
    area = resolution * resolution
    sizes = {(resolution // step * step,) * 2}
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, (area // width) // step * step)
        if height >= min_reso:
            sizes.add((width, height))
    return sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh[0]))


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space), larger area on ties."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 6), -b[0] * b[1]))


@dataclass(frozen=True)
class Crop:
    """What SDXL's micro-conditioning needs to know about how an image was prepared."""

    original_size: tuple[int, int]  # (height, width) before resizing
    top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def crop_geometry(
    size: tuple[int, int], target: tuple[int, int], center_crop: bool, flip: bool, rng: random.Random
) -> tuple[tuple[int, int], Crop, bool]:
    """Where an image of `size` (w, h) is resized to and cut for `target` (w, h), and whether it flips.

    Pure: the latent cache uses it to know an image's crop without loading it.
    """
    w, h = size
    target_w, target_h = target
    scale = max(target_w / w, target_h / h)
    rw, rh = max(target_w, round(w * scale)), max(target_h, round(h * scale))
    if center_crop:
        left, top = (rw - target_w) // 2, (rh - target_h) // 2
    else:
        left, top = rng.randint(0, rw - target_w), rng.randint(0, rh - target_h)
    flipped = flip and rng.random() < 0.5
    if flipped:
        left = rw - left - target_w  # SDXL's convention: the corner in the flipped image
    return (rw, rh), Crop((h, w), (top, left)), flipped


def resize_and_crop(
    image: Image.Image, size: tuple[int, int], center_crop: bool, flip: bool, rng: random.Random
) -> tuple[Image.Image, Crop]:
    """Resize to cover `size` (width, height), crop to it (random unless center_crop), maybe flip."""
    resized_size, crop, flipped = crop_geometry(image.size, size, center_crop, flip, rng)
    resized = image.resize(resized_size, Image.BICUBIC)
    if flipped:
        resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
    top, left = crop.top_left
    return resized.crop((left, top, left + size[0], top + size[1])), crop


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, C) in [-1, 1]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (C, H, W)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Items are looked up by (index, item_seed) pairs from EpochBatches, so augmentation is reproducible.

    `sizes[i]` is the (width, height) record i is cropped to (its bucket, or the square resolution);
    `tokens[i]` the token-id tensors of its caption that the model family needs, tokenized once up front
    (captions do not change during a run, and tokenizing was the largest part of loading an item); without
    tokens, items carry the caption text.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        sizes: list[tuple[int, int]],
        center_crop: bool,
        random_flip: bool,
        tokens: list[dict[str, torch.Tensor]] | None,
    ):
        self.records, self.sizes, self.tokens = records, sizes, tokens
        self.center_crop, self.random_flip = center_crop, random_flip

    def caption_inputs(self, index: int) -> dict[str, Any]:
        """The caption's token ids, or its text where the model family encodes from text."""
        return self.tokens[index] if self.tokens is not None else {"caption": self.records[index].caption}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        record = self.records[index]
        try:
            image = load_image(record.path)
        except OSError as err:
            raise DatasetError(f"image {record.path} cannot be read any more: {err}") from None
        image, crop = resize_and_crop(image, self.sizes[index], self.center_crop, self.random_flip, random.Random(seed))
        return {
            "pixel_values": to_tensor(image),  # (3, H, W)
            **conditioning(crop, self.sizes[index]),
            **self.caption_inputs(index),
        }


def conditioning(crop: Crop, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """SDXL's micro-conditioning inputs of one item, each (2,) as (height, width) or (top, left)."""
    return {
        "original_size": torch.tensor(crop.original_size),
        "crop_top_left": torch.tensor(crop.top_left),
        "target_size": torch.tensor((size[1], size[0])),
    }


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks every tensor field: pixel_values (B, 3, H, W), input_ids (B, L), original_size (B, 2), ...;
    text fields (caption) become lists."""
    return {
        key: torch.stack([item[key] for item in items])
        if isinstance(items[0][key], torch.Tensor)
        else [item[key] for item in items]
        for key in items[0]
    }
