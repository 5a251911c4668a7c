"""Checkpoints under an s3:// output prefix: which are complete, the newest one, fetching it, keep-last-N.

The layout is the local one (checkpoint.py) under the prefix. A checkpoint is complete once its
`state_step_<N>/manifest.json` exists: the uploader puts it after every file it lists. Pruning deletes the
manifest first, so a checkpoint half-deleted by a crash is incomplete, never picked for a resume.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError
from ..files import sha256_file
from ..layout import (
    CHECKPOINTS,
    MANIFEST,
    STATE_DIR,
    checkpoint_step,
    manifest_problem,
    state_dir_name,
    weights_name,
)
from .store import Store
from .uri import S3Uri, safe_local_path

log = logging.getLogger("lora_trainer")


def checkpoint_steps(relative_keys: list[str]) -> tuple[set[int], set[int]]:
    """(steps with a manifest, steps with any file) from keys relative to <prefix>/checkpoints/."""
    marked, present = set(), set()
    for key in relative_keys:
        step = checkpoint_step(f"{CHECKPOINTS}/{key}")
        if step is not None:
            present.add(step)
            if key == f"{state_dir_name(step)}/{MANIFEST}":
                marked.add(step)
    return marked, present


def _listing(store: Store, root: S3Uri) -> tuple[S3Uri, dict[str, int]]:
    folder = root.child(CHECKPOINTS)
    return folder, {folder.relative(k): size for k, size in store.list(folder).items()}


def read_manifest(store: Store, folder: S3Uri, step: int) -> tuple[dict | None, str | None]:
    """(manifest, None) of checkpoint `step`, or (None, why it cannot be used)."""
    data = store.get_bytes(folder.child(f"{state_dir_name(step)}/{MANIFEST}"))
    if data is None:
        return None, "it has no manifest.json"
    try:
        manifest = json.loads(data)
    except ValueError:
        return None, "its manifest.json is not JSON"
    problem = manifest_problem(manifest, step)
    return (None, problem) if problem else (manifest, None)


def complete_checkpoints(store: Store, root: S3Uri) -> Iterator[tuple[int, dict]]:
    """(step, manifest) of the checkpoints whose manifest is valid and whose files are all present with
    their sizes, newest first; each one passed over is logged with why."""
    folder, listing = _listing(store, root)
    marked, _ = checkpoint_steps(list(listing))
    for step in sorted(marked, reverse=True):
        manifest, problem = read_manifest(store, folder, step)
        if manifest and not all(listing.get(rel) == info["size"] for rel, info in manifest["files"].items()):
            manifest, problem = None, "a file it lists is missing or has the wrong size"
        if manifest:
            yield step, manifest
        else:
            log.warning("%s: checkpoint %d cannot be resumed from: %s; looking for an older one", folder, step, problem)


def newest_complete(store: Store, root: S3Uri) -> tuple[int, dict] | None:
    return next(complete_checkpoints(store, root), None)


def fetch_newest_valid(store: Store, root: S3Uri, local_out: Path) -> int | None:
    """Fetches the newest checkpoint whose files match their checksums into local_out (falling back to older
    ones with a warning); returns its step, or None when there is none."""
    for step, manifest in complete_checkpoints(store, root):
        state = fetch_checkpoint(store, root, step, manifest, local_out)
        problem = checksum_problem(state.parent, manifest)
        if problem is None:
            return step
        log.warning(
            "%s: checkpoint %d is corrupt (%s); looking for an older one", root.child(CHECKPOINTS), step, problem
        )
        shutil.rmtree(state, ignore_errors=True)
        (state.parent / weights_name(step)).unlink(missing_ok=True)
    return None


def checksum_problem(folder: Path, manifest: dict) -> str | None:
    for rel, info in manifest["files"].items():
        if sha256_file(folder / rel) != info["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def fetch_checkpoint(store: Store, root: S3Uri, step: int, manifest: dict, local_out: Path) -> Path:
    """Downloads checkpoint `step` into local_out/checkpoints (manifest last); returns its state folder."""
    folder, local = root.child(CHECKPOINTS), local_out / CHECKPOINTS
    files = [(folder.child(rel), safe_local_path(local, rel)) for rel in manifest["files"]]
    store.get_files(files)
    marker = local / state_dir_name(step) / MANIFEST
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    log.info("fetched checkpoint %d from %s", step, folder)
    return marker.parent


def fetch_named_checkpoint(store: Store, state_uri: S3Uri, local_out: Path) -> Path:
    """For `resume: s3://.../checkpoints/state_step_<N>`: that checkpoint, or ConfigError."""
    match = STATE_DIR.match(state_uri.key.rsplit("/", 1)[-1])
    parent = state_uri.key.rsplit("/", 2)
    if not match or len(parent) < 2 or parent[-2] != CHECKPOINTS:
        raise ConfigError(f"resume: {state_uri} is not a .../checkpoints/state_step_<N> URI")
    step = int(match.group(1))
    root = S3Uri(state_uri.bucket, "/".join(parent[:-2]))
    manifest, problem = read_manifest(store, root.child(CHECKPOINTS), step)
    if manifest is None:
        raise ConfigError(f"resume: {state_uri} is not a complete checkpoint: {problem}")
    return fetch_checkpoint(store, root, step, manifest, local_out)


def prune_remote(store: Store, root: S3Uri, keep: int | None) -> list[int]:
    """Deletes all but the newest `keep` complete checkpoints, and incomplete ones older than the newest."""
    folder, listing = _listing(store, root)
    marked, present = checkpoint_steps(list(listing))
    complete = sorted(marked)
    doomed = set(complete[:-keep] if keep else [])
    newest = complete[-1] if complete else -1
    doomed |= {step for step in present - marked if step < newest}
    for step in sorted(doomed):
        state = state_dir_name(step)
        rest = [folder.child(k).key for k in listing if k.startswith(f"{state}/") and k != f"{state}/{MANIFEST}"]
        if step in marked:
            store.delete(root.bucket, [folder.child(f"{state}/{MANIFEST}").key])  # incomplete first
        store.delete(root.bucket, rest + [folder.child(weights_name(step)).key])
    return sorted(doomed)
