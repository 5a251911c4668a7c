"""s3://bucket/prefix URIs, and the one rule that maps an object key to a file inside a folder.

Keys come from a listing we do not control. A key that would land outside the cache folder (`..`,
an absolute path, a backslash, control characters, or an encoding that turns into one of those once
percent-decoded or Unicode-normalized, such as `%2e%2e` or fullwidth dots) is refused, not cleaned:
silently renaming it could shadow another file. So is a key with a segment longer than a file name can be.
"""

from __future__ import annotations

import os
import unicodedata
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SCHEME = "s3://"
MAX_NAME_BYTES = 255  # the longest file name ext4, XFS and most other file systems allow


def is_s3(path: str | None) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # no leading slash; a prefix has no trailing slash either

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not is_s3(uri):
            raise ValueError(f"{uri!r} is not an s3:// URI")
        bucket, _, key = uri[len(SCHEME) :].partition("/")
        if not bucket:
            raise ValueError(f"{uri!r} names no bucket")
        return cls(bucket, key.strip("/"))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    def child(self, relative: str) -> S3Uri:
        relative = relative.strip("/")
        return S3Uri(self.bucket, f"{self.key}/{relative}" if self.key else relative)

    @property
    def folder_prefix(self) -> str:
        """The listing prefix of everything 'inside' this URI: `key/`, or '' for a whole bucket."""
        return f"{self.key}/" if self.key else ""

    def relative(self, key: str) -> str:
        """The part of `key` below this prefix (the caller listed with folder_prefix)."""
        return key[len(self.folder_prefix) :]


class UnsafeKeyError(ValueError):
    """An object key that would be written outside its folder."""


def _decoded_forms(part: str) -> set[str]:
    """The ways a name could be read by a tool on the way to disk: raw, percent-decoded, NFKC-normalized."""
    forms = {part}
    text = part
    for _ in range(3):  # %252e%252e -> %2e%2e -> ..
        text = urllib.parse.unquote(text)
        forms.add(text)
    return forms | {unicodedata.normalize("NFKC", f) for f in forms}


def check_relative_key(relative: str) -> PurePosixPath:
    """The relative key as a safe relative path, or UnsafeKeyError saying why not."""
    if not relative:
        raise UnsafeKeyError("the key is empty")
    if relative.startswith("/"):
        raise UnsafeKeyError("the key is an absolute path")
    if any(ord(c) < 32 or ord(c) == 127 for c in relative):
        raise UnsafeKeyError("the key holds control characters")
    if "\\" in relative:
        raise UnsafeKeyError("the key holds a backslash")
    parts = relative.split("/")
    for part in parts:
        if part == "":
            raise UnsafeKeyError("the key has an empty path segment ('//')")
        if part in (".", ".."):
            raise UnsafeKeyError(f"the key has a {part!r} path segment")
        if len(part.encode()) > MAX_NAME_BYTES:
            raise UnsafeKeyError(
                f"the key segment {part[:40]!r}... is {len(part.encode())} bytes long; a file name can have "
                f"at most {MAX_NAME_BYTES}"
            )
        for form in _decoded_forms(part):
            if form in (".", "..") or "/" in form or "\\" in form:
                raise UnsafeKeyError(f"the key segment {part!r} decodes to {form!r}")
    return PurePosixPath(*parts)


def safe_local_path(root: Path, relative: str) -> Path:
    """root/relative, refusing any key that would resolve outside root (symlinks included)."""
    path = root / check_relative_key(relative)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise UnsafeKeyError("the key resolves outside the cache folder")
    return path
