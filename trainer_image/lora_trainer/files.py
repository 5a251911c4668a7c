"""File writes that readers can trust: atomic replacement, hard links with a copy fallback, checksums.

Torch-free: the storage code, lora-label and the record writers use it without the training libraries.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Calls write(tmp_path), then renames: readers see the whole file or none. Disk full -> OutputError."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # on a read-only disk even the cleanup fails: report the cause
            tmp.unlink(missing_ok=True)
        raise write_error(err, path) from None


def write_error(err: OSError, path: Path, doing: str | None = None) -> OutputError:
    """The OutputError for a failed write of `path` while `doing` something: disk full, read-only, or the
    system's reason. Exit code 7, retried: a new pod has a new disk."""
    doing = doing or f"writing {path}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"disk full while {doing}: free some space under {path.parent}")
    if err.errno == errno.EROFS:
        return OutputError(f"cannot write {path}: the file system is read-only")
    return OutputError(f"{doing} failed: {err.strerror or err}")


def link_or_copy(src: Path, dst: Path) -> Path:
    """dst becomes a hard link to src (no bytes copied), or a copy where links cannot be made (another
    file system); whatever dst was before is replaced."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst
