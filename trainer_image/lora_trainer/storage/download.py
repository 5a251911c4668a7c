"""Downloads an s3:// file or prefix into a local cache: parallel, verified, incremental, restartable.

    <cache>/s3/<bucket>/<key>     the objects, under their keys
    <cache>/index/<id>.jsonl      one line per verified download: key, ETag, size, local mtime
    <cache>/tmp/                  transfers in flight; moved into place only once verified

Every key of a listing is checked before anything is written, so a hostile key (`../x`) stops the
download with nothing written. Objects download in parallel (`concurrency` requests at once); a
multipart-uploaded object downloads part by part in parallel too.

Verification costs no second read: where S3 sends a full-object checksum (CRC32, ...: what current SDKs
store) botocore checks it while the body streams; otherwise each request hashes its bytes as they
arrive and the object must match its ETag (the MD5, or for a multipart upload the MD5 of the parts'
MD5s). Where the ETag is not an MD5 (SSE-KMS, some stores) a stored checksum is checked, else the size.

An object is skipped when the index holds its ETag and size and the local file is the one that was
written; so a restart half-way fetches only what is missing, and a partial transfer never reaches the
dataset folder. Objects deleted from S3 since the last download are removed from the cache, so a
deleted image is not trained on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError, OutputError, StorageError, TrainError
from ..files import write_error
from .client import IntegrityError, Kind, Retry, classify
from .uri import S3Uri, UnsafeKeyError, safe_local_path

log = logging.getLogger("lora_trainer")
PLAIN_ETAG = re.compile(r"^[0-9a-f]{32}$")
MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-(\d+)$")


@dataclass(frozen=True)
class RemoteObject:
    key: str
    relative: str  # the local path below the download folder
    size: int
    etag: str  # without quotes


@dataclass
class DownloadStats:
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    removed: int = 0
    seconds: float = 0.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def list_objects(client: Any, uri: S3Uri, retry: Retry) -> list[dict[str, Any]]:
    """Every object under uri's folder prefix (paginated), as S3 lists them."""

    def page_all() -> list[dict[str, Any]]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.folder_prefix)
        return [obj for page in pages for obj in page.get("Contents", [])]

    return retry.call(page_all, f"list {uri}")


def remote_objects(client: Any, uri: S3Uri, retry: Retry, invalid: type[TrainError]) -> tuple[bool, list[RemoteObject]]:
    """(is_folder, objects): a prefix's objects, or the single object the URI names."""
    listed = list_objects(client, uri, retry)
    objects = [obj for obj in listed if not (obj["Key"].endswith("/") and obj["Size"] == 0)]  # folder markers
    if objects or not uri.key:
        found = [RemoteObject(o["Key"], uri.relative(o["Key"]), o["Size"], o["ETag"].strip('"')) for o in objects]
        is_folder = True
    else:
        head = retry.call(
            lambda: client.head_object(Bucket=uri.bucket, Key=uri.key), f"read {uri}", missing=lambda err: None
        )
        if head is None:
            raise invalid(f"{uri}: no such object or prefix (nothing is listed under it)")
        found = [RemoteObject(uri.key, uri.key, head["ContentLength"], head["ETag"].strip('"'))]
        is_folder = False
    if not found:
        raise invalid(f"{uri}: the prefix holds no objects")
    return is_folder, found


# -- verification
def md5() -> hashlib._Hash:
    return hashlib.md5(usedforsecurity=False)


def composite_etag(part_digests: list[bytes]) -> str:
    """The ETag S3 gives a multipart upload: MD5 of the parts' MD5 digests, '-', the number of parts."""
    return f"{hashlib.md5(b''.join(part_digests), usedforsecurity=False).hexdigest()}-{len(part_digests)}"


def crc32_b64(path: Path) -> str:
    value = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            value = zlib.crc32(chunk, value)
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def verify_checksum(client: Any, bucket: str, obj: RemoteObject, path: Path) -> None:
    """For ETags that are not an MD5: the object's stored full-object checksum, if it has one."""
    head = client.head_object(Bucket=bucket, Key=obj.key, ChecksumMode="ENABLED")
    if head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return
    if "ChecksumSHA256" in head:
        digest = hashlib.sha256(path.read_bytes()).digest()
        if base64.b64encode(digest).decode() != head["ChecksumSHA256"]:
            raise IntegrityError(f"s3://{bucket}/{obj.key}: content does not match its SHA-256 checksum")
    elif "ChecksumCRC32" in head and crc32_b64(path) != head["ChecksumCRC32"]:
        raise IntegrityError(f"s3://{bucket}/{obj.key}: content does not match its CRC32 checksum")


# -- transfer units: a whole object, or one part of a multipart object
@dataclass(frozen=True)
class Unit:
    obj: RemoteObject
    part: int  # 0: the whole object; else the part number (1-based)
    offset: int
    length: int


def plan_units(obj: RemoteObject, part_size: int | None) -> list[Unit]:
    """One unit per part when the part size is known (a multipart object), else one for the object."""
    if not part_size:
        return [Unit(obj, 0, 0, obj.size)]
    count = max(1, -(-obj.size // part_size))
    return [Unit(obj, n + 1, n * part_size, min(part_size, obj.size - n * part_size)) for n in range(count)]


def fetch_unit(client: Any, bucket: str, unit: Unit, path: Path) -> bytes | None:
    """GETs one unit into `path` at its offset; returns the MD5 digest of its bytes, or None when botocore
    checked the body against the object's full-object checksum (CRC32/CRC64/SHA) while it streamed."""
    from botocore.httpchecksum import (
        StreamingChecksumBody,  # raises FlexibleChecksumError on a mismatch
    )

    extra = {"PartNumber": unit.part} if unit.part else {}
    body = client.get_object(Bucket=bucket, Key=unit.obj.key, **extra)["Body"]
    digest, offset = None if isinstance(body, StreamingChecksumBody) else md5(), unit.offset
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in body.iter_chunks(1 << 20):
            if digest is not None:
                digest.update(chunk)
            offset += os.pwrite(fd, chunk, offset)
    finally:
        os.close(fd)
    if offset - unit.offset != unit.length:
        raise IntegrityError(
            f"s3://{bucket}/{unit.obj.key}: got {offset - unit.offset} bytes of part {unit.part}, "
            f"expected {unit.length}"
        )
    return None if digest is None else digest.digest()


# -- the cache index
class CacheIndex:
    """key -> (etag, size, mtime_ns) of verified downloads; an append-only JSONL file survives a crash."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a crash
        self._handle = None

    def fresh(self, obj: RemoteObject, local: Path) -> bool:
        entry = self.entries.get(obj.key)
        if not entry or entry["etag"] != obj.etag or entry["size"] != obj.size:
            return False
        try:
            stat = local.stat()
        except OSError:
            return False
        return stat.st_size == obj.size and stat.st_mtime_ns == entry["mtime_ns"]

    def add(self, obj: RemoteObject, local: Path) -> None:
        entry = {
            "key": obj.key,
            "relative": obj.relative,
            "etag": obj.etag,
            "size": obj.size,
            "mtime_ns": local.stat().st_mtime_ns,
        }
        self.entries[obj.key] = entry
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a")
        self._handle.write(json.dumps(entry) + "\n")
        self._handle.flush()

    def compact(self, keep: set[str]) -> None:
        """Rewrites the file with only `keep`'s entries (atomically)."""
        self.close()
        self.entries = {k: v for k, v in self.entries.items() if k in keep}
        tmp = self.path.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(e) + "\n" for e in self.entries.values()))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# -- the download
class Downloader:
    """Downloads s3:// URIs under `cache` with `concurrency` parallel requests."""

    def __init__(self, client: Any, cache: Path, retry: Retry, concurrency: int = 16):
        self.client, self.cache, self.retry, self.concurrency = client, Path(cache), retry, concurrency

    def local_path(self, uri: S3Uri) -> Path:
        return self.cache / "s3" / uri.bucket / uri.key if uri.key else self.cache / "s3" / uri.bucket

    def download(
        self,
        uri: S3Uri,
        invalid: type[TrainError] = DatasetError,
        on_file: Callable[[RemoteObject], None] | None = None,
    ) -> tuple[Path, DownloadStats]:
        """The local copy of `uri` (a folder for a prefix, a file for one object) and what it took."""
        started = time.perf_counter()
        is_folder, objects = remote_objects(self.client, uri, self.retry, invalid)
        root = self.local_path(uri) if is_folder else self.cache / "s3" / uri.bucket
        targets = {}
        for obj in objects:
            try:
                targets[obj] = safe_local_path(root, obj.relative)
            except UnsafeKeyError as err:
                raise invalid(
                    f"{uri}: refusing object key {obj.key!r}: {err}; it would be written outside the "
                    "download folder. Nothing was downloaded"
                ) from None
        index = CacheIndex(self.cache / "index" / (hashlib.sha1(str(uri).encode()).hexdigest() + ".jsonl"))
        stats = DownloadStats()
        try:
            todo = [obj for obj in objects if not index.fresh(obj, targets[obj])]
            stats.skipped = len(objects) - len(todo)
            self._check_space(uri, todo)
            self._fetch(uri, todo, targets, index, stats, on_file)
            stats.removed = self._remove_deleted(index, {o.key for o in objects}, root)
            index.compact({o.key for o in objects})
        finally:
            index.close()
        stats.seconds = time.perf_counter() - started
        log.info(
            "%s -> %s: %d file(s), %.2f MB downloaded, %d unchanged, %d removed, %.1f s (%.1f MB/s)",
            uri,
            root if is_folder else targets[objects[0]],
            stats.files,
            stats.bytes / 1e6,
            stats.skipped,
            stats.removed,
            stats.seconds,
            stats.mb_per_second,
        )
        return (root if is_folder else targets[objects[0]]), stats

    def _fetch(
        self,
        uri: S3Uri,
        todo: list[RemoteObject],
        targets: dict[RemoteObject, Path],
        index: CacheIndex,
        stats: DownloadStats,
        on_file: Callable[[RemoteObject], None] | None,
    ) -> None:
        """Rounds of parallel unit transfers; failed units are retried with backoff until the deadline."""
        tmp = self.cache / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed download
        tmp.mkdir(parents=True, exist_ok=True)
        temp = {obj: tmp / uuid.uuid4().hex for obj in todo}
        backoff = self.retry.start()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-download")
        try:
            part_sizes = self._part_sizes(pool, uri.bucket, todo)
            units = {obj: plan_units(obj, part_sizes.get(obj)) for obj in todo}
            pending = [u for obj in todo for u in units[obj]]
            digests: dict[RemoteObject, dict[int, bytes | None]] = {obj: {} for obj in todo}
            while pending:
                futures = {pool.submit(fetch_unit, self.client, uri.bucket, u, temp[u.obj]): u for u in pending}
                failed: list[tuple[Unit, BaseException]] = []
                for future in as_completed(futures):
                    unit = futures[future]
                    try:
                        digests[unit.obj][unit.part] = future.result()
                        if len(digests[unit.obj]) == len(units[unit.obj]):
                            self._commit(uri.bucket, unit.obj, temp[unit.obj], digests[unit.obj], targets[unit.obj])
                            index.add(unit.obj, targets[unit.obj])
                            stats.files, stats.bytes = stats.files + 1, stats.bytes + unit.obj.size
                            if on_file is not None:
                                on_file(unit.obj)
                    except Exception as err:  # noqa: BLE001 - classified: permanent raises, transient retries
                        if isinstance(err, OSError) and classify(err) is None:  # the local disk, not S3
                            raise write_error(
                                err, temp[unit.obj], f"downloading s3://{uri.bucket}/{unit.obj.key}"
                            ) from None
                        if classify(err) is not Kind.TRANSIENT:
                            backoff.after(err, f"download s3://{uri.bucket}/{unit.obj.key}")
                        if len(digests[unit.obj]) == len(units[unit.obj]):  # the check failed: all parts again
                            digests[unit.obj].clear()
                            temp[unit.obj].unlink(missing_ok=True)
                            failed += [(u, err) for u in units[unit.obj]]
                        else:
                            failed.append((unit, err))
                pending = [u for u, _ in failed]
                if failed:
                    backoff.after(failed[0][1], f"download {uri} ({len(failed)} transfer(s) failed)")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _check_space(self, uri: S3Uri, todo: list[RemoteObject]) -> None:
        """Fails before the first byte when the objects cannot fit in the cache's file system."""
        needed = sum(obj.size for obj in todo)
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(err, self.cache, f"creating the download cache {self.cache}") from None
        free = shutil.disk_usage(self.cache).free
        if needed > free:
            raise OutputError(
                f"{uri}: {len(todo)} object(s) of {needed / 1e6:.1f} MB do not fit in the {free / 1e6:.1f} MB free "
                f"under {self.cache}; give the pod a larger disk (or s3_cache_dir a larger volume)"
            )

    def _part_sizes(
        self, pool: ThreadPoolExecutor, bucket: str, objects: list[RemoteObject]
    ) -> dict[RemoteObject, int]:
        """Part sizes of multipart objects (HEAD ?partNumber=1), so their parts download in parallel."""
        multipart = [o for o in objects if MULTIPART_ETAG.match(o.etag) and o.size > 0]

        def part_size(obj: RemoteObject) -> int | None:
            try:
                head = self.retry.call(
                    lambda: self.client.head_object(Bucket=bucket, Key=obj.key, PartNumber=1),
                    f"read s3://{bucket}/{obj.key}",
                )
            except StorageError:  # a store without part numbers: one stream, checked by checksum or size
                return None
            parts = int(MULTIPART_ETAG.match(obj.etag).group(1))
            return head["ContentLength"] if head.get("PartsCount", parts) == parts else None

        return {o: size for o, size in zip(multipart, pool.map(part_size, multipart)) if size}

    def _commit(
        self, bucket: str, obj: RemoteObject, temp: Path, digests: dict[int, bytes | None], target: Path
    ) -> None:
        """Checks the finished file against the object's ETag (or checksum), then moves it into place."""
        size = temp.stat().st_size
        if size != obj.size:
            raise IntegrityError(f"s3://{bucket}/{obj.key}: got {size} bytes, S3 lists {obj.size}")
        if 0 in digests and digests[0] is None:
            pass  # botocore verified the full-object checksum while streaming
        else:
            etag = digests[0].hex() if 0 in digests else composite_etag([digests[n] for n in sorted(digests)])
            md5_etag = bool(PLAIN_ETAG.match(obj.etag) if 0 in digests else MULTIPART_ETAG.match(obj.etag))
            if md5_etag and etag != obj.etag:
                head = self.client.head_object(Bucket=bucket, Key=obj.key)
                if not (head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm")):
                    temp.unlink(missing_ok=True)
                    raise IntegrityError(f"s3://{bucket}/{obj.key}: content does not match its ETag")
            if etag != obj.etag:  # SSE-KMS/SSE-C, or a store whose ETag is no MD5: a stored checksum, else size
                verify_checksum(self.client, bucket, obj, temp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)

    def _remove_deleted(self, index: CacheIndex, listed: set[str], root: Path) -> int:
        removed = 0
        for key in set(index.entries) - listed:
            try:
                safe_local_path(root, index.entries[key].get("relative", "")).unlink()
                removed += 1
            except (OSError, UnsafeKeyError):
                pass
        return removed
