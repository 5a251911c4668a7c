"""A Store: put, get, list and delete objects with retries; parallel and multipart for large files."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from s3transfer.manager import TransferConfig, TransferManager

from ..errors import StorageUnavailableError
from .client import Retry, error_code
from .uri import S3Uri

# LoRA weights and optimizer state are a few MB to a few hundred MB: files above 16 MiB go in 16 MiB parts,
# in parallel, and a failed part is retried alone (S3 allows 10,000 parts, so up to 160 GB)
MULTIPART_THRESHOLD = 16 * 1024 * 1024
PART_SIZE = 16 * 1024 * 1024
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes


class Store:
    """Puts, lists and deletes objects with retries. Files under the multipart threshold are read into
    memory first, so a file that grows meanwhile (a TensorBoard event file) uploads as one consistent snapshot."""

    def __init__(
        self,
        client: Any,
        retry: Retry,
        concurrency: int = 8,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
    ):
        self.client, self.retry, self.threshold = client, retry, multipart_threshold
        self.config = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=part_size, max_request_concurrency=concurrency
        )
        self._manager: TransferManager | None = None
        self._closed = False

    @property
    def manager(self) -> TransferManager:
        if self._closed:  # an upload still retrying at exit must not start new transfer threads
            raise StorageUnavailableError("the S3 store was closed (the trainer is exiting)")
        if self._manager is None:
            self._manager = TransferManager(self.client, self.config)
        return self._manager

    def put_files(self, files: list[tuple[Path, S3Uri]]) -> None:
        """Uploads (local path, destination) pairs in parallel; failed ones are retried until the deadline."""
        backoff = self.retry.start()
        while files:
            futures = [(path, uri, self._submit(path, uri)) for path, uri in files]
            failed = []
            for path, uri, future in futures:
                try:
                    future.result()
                except Exception as err:  # noqa: BLE001 - Backoff.after classifies and raises or waits
                    failed.append((path, uri, err))
            if failed:
                backoff.after(failed[0][2], f"upload {failed[0][1]} ({len(failed)} file(s) failed)")
            files = [(path, uri) for path, uri, _ in failed]

    def get_files(self, files: list[tuple[S3Uri, Path]]) -> None:
        """Downloads (source, local path) pairs in parallel; each lands under a temporary name, then is renamed."""
        backoff = self.retry.start()
        while files:
            futures = []
            for uri, path in files:
                path.parent.mkdir(parents=True, exist_ok=True)
                futures.append((uri, path, self.manager.download(uri.bucket, uri.key, str(path))))
            failed = []
            for uri, path, future in futures:
                try:
                    future.result()
                except Exception as err:  # noqa: BLE001 - Backoff.after classifies and raises or waits
                    failed.append((uri, path, err))
            if failed:
                backoff.after(failed[0][2], f"download {failed[0][0]} ({len(failed)} file(s) failed)")
            files = [(uri, path) for uri, path, _ in failed]

    def _submit(self, path: Path, uri: S3Uri):
        if path.stat().st_size < self.threshold:
            return self.manager.upload(io.BytesIO(path.read_bytes()), uri.bucket, uri.key)
        return self.manager.upload(str(path), uri.bucket, uri.key)

    def get_bytes(self, uri: S3Uri) -> bytes | None:
        """The object's content, or None if it does not exist."""
        return self.retry.call(
            lambda: self.client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read(),
            f"read {uri}",
            missing=lambda err: None,
        )

    def get_with_etag(self, uri: S3Uri, max_bytes: int) -> tuple[bytes, str] | None:
        """(the first max_bytes of the object, its ETag), or None if it does not exist."""

        def get() -> tuple[bytes, str]:
            response = self.client.get_object(Bucket=uri.bucket, Key=uri.key, Range=f"bytes=0-{max_bytes}")
            return response["Body"].read(max_bytes + 1), response["ETag"]

        return self.retry.call(get, f"read {uri}", missing=lambda err: None)

    def put_if(self, uri: S3Uri, body: bytes, etag: str | None) -> bool:
        """Puts `body` only if the object is still the one with `etag` (None: only if there is none); False
        when another writer came first. A store without conditional writes ignores the condition."""
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}

        def put() -> bool:
            try:
                self.client.put_object(Bucket=uri.bucket, Key=uri.key, Body=body, **condition)
            except Exception as err:  # noqa: BLE001 - only a failed condition is an answer; the rest is retried
                code, status = error_code(err)
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
            return True

        return self.retry.call(put, f"write {uri}")

    def exists(self, uri: S3Uri) -> bool:
        return self.retry.call(
            lambda: bool(self.client.head_object(Bucket=uri.bucket, Key=uri.key)),
            f"read {uri}",
            missing=lambda err: False,
        )

    def list(self, prefix: S3Uri) -> dict[str, int]:
        """key -> size of every object under prefix's folder."""

        def page_all() -> dict[str, int]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=prefix.bucket, Prefix=prefix.folder_prefix
            )
            return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

        return self.retry.call(page_all, f"list {prefix}")

    def delete(self, bucket: str, keys: list[str]) -> None:
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + DELETE_BATCH]]
            self.retry.call(
                lambda batch=batch: self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}),
                f"delete {len(batch)} object(s) in s3://{bucket}",
            )

    def close(self) -> None:
        """Cancels what is still queued (only a run cut short has any) and stops the transfer threads."""
        self._closed = True
        if self._manager is not None:
            self._manager.shutdown(cancel=True, cancel_msg="the trainer is exiting")
            self._manager = None
