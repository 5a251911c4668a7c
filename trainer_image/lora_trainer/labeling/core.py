"""Captioning a folder of images into metadata.csv (columns file_name,text), the lora-scripts way.

Images that already have a caption (in the CSV, or a .txt file beside them) keep it unless overwrite is
set; images that cannot be read are listed and skipped, and a captioning batch that fails is retried
image by image, so one bad image never costs the others their captions. The CSV is written atomically:
an interrupted run leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..data.images import list_images, load_image, read_metadata_csv
from ..errors import DatasetError, TrainError

log = logging.getLogger("lora_trainer")


class CaptionModel(Protocol):
    def caption(self, images: list) -> list[str]: ...


@dataclass
class LabelReport:
    output: Path
    captioned: list[str] = field(default_factory=list)  # file names captioned now
    kept: list[str] = field(default_factory=list)  # file names whose existing caption was kept
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file name, why)

    def lines(self) -> list[str]:
        out = [f"{self.output}: {len(self.captioned)} captioned, {len(self.kept)} kept, {len(self.failed)} skipped"]
        out += [f"  skipped {name}: {why}" for name, why in self.failed]
        return out


def compose(caption: str, prefix: str = "", suffix: str = "") -> str:
    """'sks' + 'a dog on a beach' + 'photo' -> 'sks, a dog on a beach, photo' (a trigger word is a prefix).
    A caption that already carries the prefix/suffix does not get it twice."""
    parts = [caption.strip()]
    if prefix and not parts[0].startswith(prefix):
        parts.insert(0, prefix)
    if suffix and not parts[-1].endswith(suffix):
        parts.append(suffix)
    return ", ".join(p for p in parts if p)


def relative_name(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def existing_captions(
    folder: Path,
    csv_paths: Sequence[Path],
    caption_extension: str = ".txt",
    image_column: str = "file_name",
    caption_column: str = "text",
) -> dict[str, str]:
    """file name -> caption from .txt files beside the images, overridden by the CSVs that exist (later wins)."""
    captions = {}
    for image in list_images(folder):
        txt = image.with_suffix(caption_extension)
        if txt.is_file():
            try:
                captions[relative_name(image, folder)] = txt.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as err:
                log.warning("caption file %s cannot be read (%s); the image will be captioned", txt, err)
    for csv_path in dict.fromkeys(csv_paths):
        if csv_path.is_file():
            captions.update(read_metadata_csv(csv_path, image_column, caption_column))
    return {name: text for name, text in captions.items() if text}


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def caption_images(
    paths: list[Path],
    model: CaptionModel,
    batch_size: int = 8,
    prefix: str = "",
    suffix: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[Path, str], list[tuple[Path, str]]]:
    """(captions, failures). Unreadable images fail alone; a failing batch is retried one image at a time."""
    captions: dict[Path, str] = {}
    failed: list[tuple[Path, str]] = []
    loaded = []
    for path in paths:
        try:
            loaded.append((path, load_image(path)))
        except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
            failed.append((path, f"cannot be read: {type(err).__name__}: {err}"))
    for batch in chunks(loaded, batch_size):
        for path, text in _caption_batch(batch, model, failed):
            if text.strip():
                captions[path] = compose(text, prefix, suffix)
            else:
                failed.append((path, "the model returned an empty caption"))
        if progress:
            progress(len(captions) + len(failed), len(paths))
    return captions, failed


def _caption_batch(batch, model: CaptionModel, failed: list) -> list[tuple[Path, str]]:
    try:
        texts = model.caption([image for _, image in batch])
        if len(texts) != len(batch):
            raise ValueError(f"the model returned {len(texts)} captions for {len(batch)} images")
        return [(path, text) for (path, _), text in zip(batch, texts)]
    except TrainError:  # the model cannot be loaded: no image is to blame
        raise
    except Exception as err:  # noqa: BLE001 - find the image that breaks the model, keep the others
        if len(batch) == 1:
            failed.append((batch[0][0], f"captioning failed: {type(err).__name__}: {err}"))
            return []
        log.warning("a captioning batch failed (%s); retrying its %d images one by one", err, len(batch))
        return [item for one in batch for item in _caption_batch([one], model, failed)]


def render_csv(rows: dict[str, str], image_column: str = "file_name", caption_column: str = "text") -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([image_column, caption_column])
    for name in sorted(rows):
        writer.writerow([name, rows[name]])
    return buffer.getvalue()


def write_metadata_csv(
    path: Path, rows: dict[str, str], image_column: str = "file_name", caption_column: str = "text"
) -> Path:
    from ..files import atomic_write

    text = render_csv(rows, image_column, caption_column)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def label_folder(
    folder: Path,
    output: Path,
    model: CaptionModel,
    *,
    overwrite: bool = False,
    batch_size: int = 8,
    prefix: str = "",
    suffix: str = "",
    caption_extension: str = ".txt",
    image_column: str = "file_name",
    caption_column: str = "text",
) -> LabelReport:
    """Captions every image under `folder` that has no caption (all of them with overwrite) into `output`."""
    if not folder.is_dir():
        raise DatasetError(f"--input {folder} is not a folder")
    images = list_images(folder)
    if not images:
        raise DatasetError(f"{folder} holds no images")
    names = {p: relative_name(p, folder) for p in images}
    existing = existing_captions(
        folder, [folder / "metadata.csv", output], caption_extension, image_column, caption_column
    )
    stale = sorted(set(existing) - set(names.values()))
    if stale:
        log.warning("dropping %d caption(s) of images that no longer exist: %s", len(stale), ", ".join(stale[:5]))
    todo = [p for p in images if overwrite or names[p] not in existing]
    log.info("%d image(s) to caption, %d already captioned", len(todo), len(images) - len(todo))

    def progress(done: int, total: int) -> None:
        log.info("captioned %d/%d", done, total)

    captions, failed = caption_images(todo, model, batch_size, prefix, suffix, progress) if todo else ({}, [])
    rows = {names[p]: existing[names[p]] for p in images if names[p] in existing}  # kept, also if re-captioning fails
    rows.update({names[p]: text for p, text in captions.items()})
    report = LabelReport(output)
    report.captioned = sorted(names[p] for p in captions)
    report.kept = sorted(set(rows) - set(report.captioned))
    report.failed = sorted((names[p], why) for p, why in failed)
    if todo and not captions and not report.kept:
        raise DatasetError(
            f"no image under {folder} could be captioned: " + "; ".join(f"{n}: {why}" for n, why in report.failed[:5])
        )
    write_metadata_csv(output, rows, image_column, caption_column)
    return report
