"""Before a run: resolve every s3:// path of the config to a local one, and set up the output mirrors.

In order, so that a run fails fast and leaves nothing behind when it cannot work:
  1. every bucket named in the config answers (wrong credentials, a missing bucket: StorageError now)
  2. an s3:// output_dir that another run owns (ownership.py) or that holds a finished run is refused
     unless `overwrite: true`
  3. dataset, metadata, validation data, base model are downloaded into the cache (DatasetError /
     ModelError if absent)
  4. the run claims the output prefix, the first thing it writes there; with `overwrite: true` it takes
     the prefix over and deletes the earlier run's files
  5. the output's local working copy is emptied, and the resume checkpoint (and with auto_label, an
     earlier attempt's captions) fetched into it from S3

The result is a config with local paths only (what the recipe runs), plus the mirror observers that
copy the working folders back to S3.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import DatasetError, ModelError, StorageError
from ..layout import CAPTIONS, CHECKPOINTS, FINAL_WEIGHTS, state_dir_name
from ..outputs import run_files
from ..ownership import MAX_MARKER_BYTES, OWNER_MARKER, Owner, claim_problem, owner_from_env, parse_marker
from ..summary import RunSummary
from ..termination import LocalOutputs
from .client import Retry, make_client, probe_bucket
from .download import Downloader
from .mirror import S3Mirror
from .remote_checkpoints import fetch_named_checkpoint, fetch_newest_valid, newest_complete
from .store import Store
from .upload import Uploader
from .uri import S3Uri, is_s3

log = logging.getLogger("lora_trainer")
CLAIM_ATTEMPTS = 3  # a claim lost to another writer is re-read; a third loss in a row is a fight
INPUTS: dict[str, type] = {
    "train_data_dir": DatasetError,
    "metadata_path": DatasetError,
    "validation_data": DatasetError,
    "base_model": ModelError,
    "base_model_config": ModelError,
}


def s3_keys(cfg: TrainConfig) -> list[str]:
    """The config keys whose value is an s3:// URI."""
    keys = [*INPUTS, "output_dir", "logging_dir", "resume"]
    return [k for k in keys if is_s3(getattr(cfg, k))]


def default_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("LORA_CACHE_DIR") or Path.home() / ".cache" / "lora-operator") / "s3"


class StorageSession:
    """The S3 side of one run. prepare() -> local config; mirrors observe the run; close() at exit."""

    def __init__(
        self,
        cfg: TrainConfig,
        grace_deadline: Callable[[], float | None] = lambda: None,
        client: Any = None,
        stopping: Callable[[], bool] = lambda: False,
        outputs: bool = True,
    ):
        self.cfg, self.grace_deadline, self.stopping = cfg, grace_deadline, stopping
        self.with_outputs = outputs  # False: a worker process that reads the inputs and writes nothing
        self.cache = Path(cfg.s3_cache_dir) if cfg.s3_cache_dir else default_cache_dir()
        self.retry = Retry(seconds=cfg.s3_retry_seconds)
        self.client = client
        self.store: Store | None = None
        self.uploader: Uploader | None = None
        self.mirrors: list[S3Mirror] = []
        self.output_mirror: S3Mirror | None = None
        self.local_cfg = cfg
        self.owner = owner_from_env()

    @property
    def active(self) -> bool:
        return bool(s3_keys(self.cfg))

    def prepare(self) -> TrainConfig:
        cfg = self.cfg
        if not self.active:
            return cfg
        self.client = self.client or make_client(cfg.s3_endpoint_url, cfg.s3_max_concurrency + 4)
        self.store = Store(self.client, self.retry, concurrency=cfg.s3_max_concurrency)
        for bucket in sorted({S3Uri.parse(getattr(cfg, k)).bucket for k in s3_keys(cfg)}):
            probe_bucket(self.client, bucket, self.retry)
        out = S3Uri.parse(cfg.output_dir) if is_s3(cfg.output_dir) and self.with_outputs else None
        if out is not None:
            self.check_output(out)
        local = {key: self.download(key) for key in INPUTS if is_s3(getattr(cfg, key))}
        if "train_data_dir" in local or "metadata_path" in local:
            local["dataset_read_only"] = True  # a download cache that later runs share: auto_label leaves it be
        if out is not None:  # the inputs are there: now the run writes, first of all its claim on the prefix
            claim_prefix(self.store, out, self.owner, cfg.overwrite)
            if cfg.overwrite:
                self.clear_earlier_run(out)
        if self.with_outputs:
            local.update(self.outputs())
        self.local_cfg = dataclasses.replace(cfg, **local)
        return self.local_cfg

    def download(self, key: str) -> str:
        downloader = Downloader(self.client, self.cache, self.retry, self.cfg.s3_max_concurrency)
        path, _ = downloader.download(S3Uri.parse(getattr(self.cfg, key)), invalid=INPUTS[key])
        return str(path)

    def check_output(self, out: S3Uri) -> None:
        """Before any download: a prefix another run owns, or a finished run, is never written by accident."""
        held = self.store.get_with_etag(out.child(OWNER_MARKER), MAX_MARKER_BYTES)
        problem = claim_problem(held[0] if held else None, self.owner, self.cfg.overwrite, str(out))
        if problem:
            raise StorageError(problem)
        if not self.cfg.overwrite and self.store.exists(out.child(FINAL_WEIGHTS)):
            raise StorageError(
                f"output_dir {out} holds a finished run ({FINAL_WEIGHTS}); choose another "
                "output prefix, or set overwrite: true to replace it"
            )

    def clear_earlier_run(self, out: S3Uri) -> None:
        """overwrite: true deletes the earlier run's files (a user's own files under the prefix stay)."""
        doomed = [key for key in self.store.list(out) if self._is_run_file(out, out.relative(key))]
        self.store.delete(out.bucket, doomed)
        log.info("overwrite: deleted %d object(s) of an earlier run under %s", len(doomed), out)

    def _is_run_file(self, out: S3Uri, rel: str) -> bool:
        logs = _relative_to(self.cfg.logging_dir, str(out))
        folders = ["checkpoints/", "samples/"] + ([logs.rstrip("/") + "/"] if logs else [])
        return rel in run_files(self.cfg) or rel.startswith(tuple(folders))

    def outputs(self) -> dict[str, str]:
        """Local working folders for s3:// output_dir / logging_dir, their mirrors, and the resume checkpoint."""
        cfg, local = self.cfg, {}
        if is_s3(cfg.output_dir) or is_s3(cfg.logging_dir):
            self.uploader = Uploader(cfg.s3_upload_queue, self.stopping).start()
        out_local = None
        if is_s3(cfg.output_dir):
            out = S3Uri.parse(cfg.output_dir)
            out_local = self.working_folder(out)
            local["output_dir"] = str(out_local)
            self.output_mirror = self.mirror(out_local, out, keep=cfg.keep_checkpoints)
            self.mirrors.append(self.output_mirror)
            local.update(self.resume_from(out, out_local))
            if cfg.auto_label:
                self.fetch_earlier_captions(out, out_local)
        if is_s3(cfg.logging_dir):
            inside = _relative_to(cfg.logging_dir, cfg.output_dir)
            if inside is not None and out_local is not None:
                local["logging_dir"] = str(out_local / inside)
            else:
                logs = S3Uri.parse(cfg.logging_dir)
                local["logging_dir"] = str(self.working_folder(logs))
                self.mirrors.append(self.mirror(Path(local["logging_dir"]), logs))
        if is_s3(cfg.resume) and "resume" not in local:
            raise StorageError(f"resume: {cfg.resume} is on S3 but output_dir is local; download it first")
        return local

    def working_folder(self, uri: S3Uri) -> Path:
        """The local copy of an output prefix: emptied, since S3 holds the truth and resume refetches it."""
        folder = self.cache / "runs" / uri.bucket / uri.key
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def mirror(self, local: Path, remote: S3Uri, keep: int | None = None) -> S3Mirror:
        return S3Mirror(
            local,
            remote,
            self.store,
            self.uploader,
            keep=keep,
            sync_seconds=self.cfg.s3_sync_seconds,
            grace_deadline=self.grace_deadline,
        )

    def resume_from(self, out: S3Uri, out_local: Path) -> dict[str, str]:
        resume = self.cfg.resume
        if is_s3(resume):
            return {"resume": str(fetch_named_checkpoint(self.store, S3Uri.parse(resume), out_local))}
        if resume == "latest":
            fetch_newest_valid(self.store, out, out_local)  # none: the recipe says it starts from step 0
        elif resume is None and not self.cfg.overwrite and newest_complete(self.store, out):
            raise StorageError(
                f"output_dir {out} holds checkpoints of an earlier run; set resume: latest to "
                "continue it, or overwrite: true to start over"
            )
        return {}

    def fetch_earlier_captions(self, out: S3Uri, out_local: Path) -> None:
        """The captions an earlier attempt's auto_label wrote (output_dir/metadata.csv): a restarted attempt
        trains on the same text instead of captioning again."""
        data = self.store.get_bytes(out.child(CAPTIONS))
        if data is not None:
            (out_local / CAPTIONS).write_bytes(data)
            log.info("auto_label: captions of an earlier attempt fetched from %s", out.child(CAPTIONS))

    # -- for the termination message
    @property
    def local_output_dir(self) -> str:
        return self.local_cfg.output_dir

    def uri_for(self, path: str | Path) -> str:
        for mirror in self.mirrors:
            uri = mirror.uri_for(path)
            if uri:
                return uri
        return str(Path(path).resolve())

    @property
    def problem(self) -> str | None:
        return next((m.problem for m in self.mirrors if m.problem), None)

    def last_checkpoint(self, summary: RunSummary) -> tuple[int, str] | None:
        """The newest checkpoint a next attempt can resume from: uploaded, or the one this run resumed from."""
        output = self.output_mirror
        if output is None:
            return LocalOutputs(self.local_cfg.output_dir).last_checkpoint(summary)
        steps = [*output.uploaded_checkpoints, *([summary.resumed_from] if summary.resumed_from else [])]
        if not steps:
            return None
        return max(steps), str(output.remote.child(f"{CHECKPOINTS}/{state_dir_name(max(steps))}"))

    def close(self) -> None:
        if self.uploader is not None:
            self.uploader.close(timeout=1.0)
        if self.store is not None:
            self.store.close()


def claim_prefix(store: Store, out: S3Uri, ours: Owner, overwrite: bool) -> None:
    """Writes our marker at out/.lora-owner.json, or StorageError naming the owner that holds the prefix.
    Conditional writes make it atomic: of two runs claiming at once, one wins and the other re-reads."""
    marker = out.child(OWNER_MARKER)
    for _ in range(CLAIM_ATTEMPTS):
        held = store.get_with_etag(marker, MAX_MARKER_BYTES)
        problem = claim_problem(held[0] if held else None, ours, overwrite, str(out))
        if problem:
            raise StorageError(problem)
        if held and parse_marker(held[0])[0].id == ours.id:
            return
        if held:
            log.warning("overwrite: taking %s over from %s", out, parse_marker(held[0])[0].name)
        if store.put_if(marker, ours.marker(), held[1] if held else None):
            return
    raise StorageError(f"output_dir {out}: other runs keep claiming it at the same moment; choose another prefix")


def _relative_to(path: str | None, parent: str) -> str | None:
    """path below parent ('logs' for s3://b/run/logs under s3://b/run), else None."""
    if not path or not parent:
        return None
    parent = parent.rstrip("/") + "/"
    return path[len(parent) :].strip("/") if path.startswith(parent) else None
