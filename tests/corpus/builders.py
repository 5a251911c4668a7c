"""What a corpus case builds rather than stores: files too big, too binary or too hostile to keep in git.

Each builder is named in a case.yaml under `build:` as {name: {arguments}} and gets the dataset folder
first. Keep them small and obvious; a new kind of damage is a new function here.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

from PIL import Image


def png_header(folder: Path, name: str, width: int, height: int) -> None:
    """A PNG declaring width x height pixels in a few bytes: a decompression bomb, or a 0-pixel image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (folder / name).write_bytes(data)


def truncate(folder: Path, name: str, keep: float) -> None:
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def image(
    folder: Path, name: str, mode: str = "RGB", size: tuple[int, int] = (40, 24), format: str | None = None, **info
) -> None:
    """An image in any Pillow mode and format (CMYK JPEG, 16-bit PNG, palette, ...); EXIF orientation via exif."""
    picture = Image.new(mode, tuple(size), 200 if mode in ("L", "I;16", "I", "1", "P") else None)
    exif = Image.Exif()
    if "orientation" in info:
        exif[0x0112] = info.pop("orientation")
    picture.save(folder / name, format=format, exif=exif, **info)


def symlink(folder: Path, name: str, target: str) -> None:
    """A symbolic link in the dataset; `target` relative to the dataset's parent (where `outside/` is)."""
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.png").write_bytes((folder / next(p.name for p in folder.glob("*.png"))).read_bytes())
    (outside / "secret.txt").write_text("a caption from outside the dataset")
    (folder / name).symlink_to(folder.parent / target)


def write_bytes(
    folder: Path, name: str, hex: str = "", text: str = "", encoding: str = "utf-8", repeat: int = 1
) -> None:
    """A file of raw bytes (hex) or text in any encoding (latin-1, utf-16, ...), optionally repeated."""
    data = bytes.fromhex(hex) if hex else text.encode(encoding)
    (folder / name).write_bytes(data * repeat)


def append_bytes(folder: Path, name: str, hex: str = "", text: str = "", encoding: str = "utf-8") -> None:
    with (folder / name).open("ab") as handle:
        handle.write(bytes.fromhex(hex) if hex else text.encode(encoding))


def jsonl_record(folder: Path, name: str, record: dict | None = None, text_mb: float = 0, nested: int = 0) -> None:
    """Appends one JSONL line: a given record, a text record of text_mb megabytes, or arrays nested `nested` deep."""
    if nested:
        line = "[" * nested + "]" * nested
    elif text_mb:
        line = json.dumps({"text": "lorem ipsum dolor sit amet " * int(text_mb * 1e6 / 27)})
    else:
        line = json.dumps(record, ensure_ascii=False)
    with (folder / name).open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def remove(folder: Path, names: list[str]) -> None:
    for name in names:
        path = folder / name
        path.unlink() if path.is_file() or path.is_symlink() else None


def flip_last_byte(folder: Path, name: str) -> None:
    """Damages a file of the earlier run's output (folder is output_dir there)."""
    path = folder / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_json(folder: Path, name: str, set: dict) -> None:
    """Sets keys of a JSON file: 'files/<name>' is key <name> of the object under 'files' (the rest of the path
    is one key, slashes and all); a value of null deletes the key."""
    path = folder / name
    data = json.loads(path.read_text())
    for dotted, value in set.items():
        *parents, last = dotted.split("/", 1)
        node = data
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path.write_text(json.dumps(data))


def fill(folder: Path, name: str, megabytes: float) -> None:
    """A file of incompressible bytes."""
    (folder / name).write_bytes(os.urandom(int(megabytes * 1e6)))
