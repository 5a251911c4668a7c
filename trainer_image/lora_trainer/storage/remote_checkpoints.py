"""Checkpoints under an s3:// output prefix: which are complete, the newest one, fetching it, keep-last-N.

The layout is the local one (checkpoint.py) under the prefix. A checkpoint is complete once its
`state_step_<N>/manifest.json` exists: the uploader puts it after every file it lists. Pruning deletes the
manifest first, so a checkpoint half-deleted by a crash is incomplete, never picked for a resume.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import ConfigError
from ..layout import (
    CHECKPOINTS,
    MANIFEST,
    STATE_DIR,
    checkpoint_step,
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


def read_manifest(store: Store, folder: S3Uri, step: int) -> dict | None:
    data = store.get_bytes(folder.child(f"{state_dir_name(step)}/{MANIFEST}"))
    try:
        manifest = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def newest_complete(store: Store, root: S3Uri) -> tuple[int, dict] | None:
    """(step, manifest) of the newest checkpoint whose manifest's files are all present with their sizes."""
    folder, listing = _listing(store, root)
    marked, _ = checkpoint_steps(list(listing))
    for step in sorted(marked, reverse=True):
        manifest = read_manifest(store, folder, step)
        if manifest and all(listing.get(rel) == info.get("size") for rel, info in manifest["files"].items()):
            return step, manifest
        log.warning("%s: checkpoint %d is incomplete on S3; looking for an older one", folder, step)
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
    manifest = read_manifest(store, root.child(CHECKPOINTS), step)
    if manifest is None:
        raise ConfigError(f"resume: {state_uri} has no manifest.json: it is not a complete checkpoint")
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
