"""Resumable data order, and checkpoints stored without pickle."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from lora_trainer.checkpoint import (
    CheckpointState,
    canonical_safetensors,
    flatten,
    list_checkpoints,
    load_checkpoint,
    load_resume_point,
    prune_checkpoints,
    save_checkpoint,
    sort_safetensors_metadata,
    unflatten,
)
from lora_trainer.data.sampler import EpochBatches, EpochPlan, group_by
from lora_trainer.errors import ConfigError


@pytest.mark.parametrize(
    "items, batch, accum, batches, steps, groups",
    [
        (8, 4, 1, 2, 2, [1, 1]),
        (9, 4, 1, 3, 3, [1, 1, 1]),
        (9, 2, 2, 5, 3, [2, 2, 1]),
        (1, 8, 4, 1, 1, [1]),
    ],
)
def test_epoch_plan(items, batch, accum, batches, steps, groups):
    plan = EpochPlan.single(items, batch, accum)
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.step_groups()) == (batches, steps, groups)
    assert plan.total_steps(epochs=3, max_train_steps=None) == 3 * steps
    assert plan.epochs_needed(3 * steps + 1) == 4


def test_order_depends_on_seed_and_epoch_only():
    plan = EpochPlan.single(50, 50, 1)
    assert plan.batches(seed=1, epoch=0) == plan.batches(seed=1, epoch=0)
    assert plan.batches(seed=1, epoch=0) != plan.batches(seed=1, epoch=1)
    assert plan.batches(seed=1, epoch=0) != plan.batches(seed=2, epoch=0)
    assert sorted(plan.batches(seed=1, epoch=3)[0]) == list(range(50))


def test_resumed_epoch_yields_exactly_the_remaining_batches_and_item_seeds():
    plan = EpochPlan.single(num_items=11, batch_size=3, accumulation=1)
    full = list(EpochBatches(plan, seed=7, epoch=2))
    assert [len(b) for b in full] == [3, 3, 3, 2]
    assert list(EpochBatches(plan, seed=7, epoch=2, start_batch=2)) == full[2:]
    assert len(EpochBatches(plan, seed=7, epoch=2, start_batch=2)) == 2


def test_buckets_never_mix_and_cover_every_item_once():
    keys = ["wide", "tall", "wide", "square", "tall", "wide", "wide", "tall"]
    groups = group_by(keys)
    assert groups == ((0, 2, 5, 6), (1, 4, 7), (3,))
    plan = EpochPlan(groups, batch_size=2, accumulation=1)
    assert plan.batches_per_epoch == 2 + 2 + 1 and plan.num_items == 8
    for epoch in range(3):
        batches = plan.batches(seed=5, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(8))
        assert all(len({keys[i] for i in b}) == 1 for b in batches)
    assert plan.batches(5, 0) != plan.batches(5, 1)  # batch order shuffles across buckets too
    resumed = list(EpochBatches(plan, seed=5, epoch=1, start_batch=3))
    assert resumed == list(EpochBatches(plan, seed=5, epoch=1))[3:]


def test_nested_state_round_trips_through_json_and_tensors():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "name": None}],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "__weird": 1,
    }
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(flatten(state, tensors)))
    back = unflatten(tree, tensors)
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["python"] == state["python"]
    assert np.array_equal(back["numpy"][1], state["numpy"][1]) and back["numpy"][0] == "MT19937"
    random.setstate(back["python"])  # accepted as a real RNG state
    assert back["__weird"] == 1


def test_flatten_refuses_objects_it_cannot_store_without_pickle():
    with pytest.raises(TypeError, match="cannot checkpoint a object"):
        flatten({"x": object()}, {})


def _state(step: int) -> CheckpointState:
    return CheckpointState(
        trainer={"step": step, "losses": [[1, 0.5]]},
        optimizer={"state": {0: {"m": torch.ones(2) * step}}},
        scheduler={"last_epoch": step},
        rng={"torch": torch.get_rng_state()},
    )


def test_canonical_safetensors_sorts_metadata_and_keeps_the_tensors():
    from safetensors.torch import load, save

    tensors = {"b.lora_A.weight": torch.randn(2, 3), "a.lora_B.weight": torch.randn(3, 2, dtype=torch.float16)}
    metadata = {f"key{i}": str(i) for i in range(20)}
    files = {canonical_safetensors(save(tensors, metadata=dict(reversed(metadata.items())))) for _ in range(5)}
    assert len(files) == 1  # safetensors alone writes metadata in hash-map order: 5 differing files
    data = files.pop()
    size = int.from_bytes(data[:8], "little")
    assert size % 8 == 0 and list(json.loads(data[8 : 8 + size])["__metadata__"]) == sorted(metadata)
    loaded = load(data)
    assert all(loaded[k].equal(v) for k, v in tensors.items())


def test_metadata_of_a_file_on_disk_is_sorted_in_place(tmp_path):
    from safetensors.torch import save, save_file

    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    metadata = {f"key{i}": f"värde {i}" for i in range(20)}  # non-ASCII stays as safetensors wrote it
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata)
    sort_safetensors_metadata(tmp_path / "x.safetensors")
    assert (tmp_path / "x.safetensors").read_bytes() == canonical_safetensors(save(tensors, metadata=metadata))


def test_checkpoint_round_trip_and_latest(tmp_path):
    weights = {"unet.a.lora.down.weight": torch.randn(4, 8)}
    for step in (10, 20):
        save_checkpoint(tmp_path, step, weights, {"rank": "4"}, _state(step))
    (latest, loaded, state), passed_over = load_resume_point(tmp_path, "latest")
    assert latest.step == 20 and passed_over == []
    assert torch.equal(loaded["unet.a.lora.down.weight"], weights["unet.a.lora.down.weight"])
    assert torch.equal(state.optimizer["state"][0]["m"], torch.ones(2) * 20)
    assert state.scheduler == {"last_epoch": 20} and state.trainer["step"] == 20


def test_a_checkpoint_without_manifest_is_never_picked(tmp_path):
    save_checkpoint(tmp_path, 10, {"w": torch.ones(1)}, {}, _state(10))
    save_checkpoint(tmp_path, 20, {"w": torch.ones(1)}, {}, _state(20))
    (tmp_path / "checkpoints/state_step_20/manifest.json").unlink()  # as if the save was cut off
    assert [c.step for c in list_checkpoints(tmp_path)] == [10]
    (latest, _, _), passed_over = load_resume_point(tmp_path, "latest")
    assert latest.step == 10 and passed_over == []  # an incomplete save is not worth a warning


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_checkpoint_file_is_detected(tmp_path):
    ckpt = save_checkpoint(tmp_path, 5, {"w": torch.ones(3)}, {}, _state(5))
    flip_last_byte(ckpt.state_dir / "optimizer.safetensors")
    with pytest.raises(
        ConfigError, match="is incomplete or corrupt: state_step_5/optimizer.safetensors does not match"
    ):
        load_resume_point(tmp_path, str(ckpt.state_dir))
    with pytest.raises(ConfigError, match="corrupt"):
        load_checkpoint(ckpt)


def rewrite_manifest(state_dir, change):
    manifest = json.loads((state_dir / "manifest.json").read_text())
    change(manifest)
    (state_dir / "manifest.json").write_text(json.dumps(manifest))


def sign_state_json(state_dir, text):
    """A state.json that matches its manifest but is no checkpoint state: a writer we do not know."""
    import hashlib

    (state_dir / "state.json").write_text(text)
    entry = {"size": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    rewrite_manifest(state_dir, lambda m: m["files"].__setitem__(f"{state_dir.name}/state.json", entry))


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda d: flip_last_byte(d / "rng.safetensors"), "state_step_20/rng.safetensors does not match its checksum"),
        (
            lambda d: flip_last_byte(d.parent / "pytorch_lora_weights_step_20.safetensors"),
            "does not match its checksum",
        ),
        (lambda d: sign_state_json(d, "[1, 2"), "cannot be read: JSONDecodeError"),
        (lambda d: sign_state_json(d, '{"format_version": 1}'), "cannot be read: KeyError: 'trainer'"),
        (lambda d: sign_state_json(d, '{"format_version": 99}'), "has format 99, expected 1"),
        (lambda d: flip_last_byte(d / "manifest.json"), None),  # not JSON: not complete, passed over silently
        (lambda d: rewrite_manifest(d, lambda m: m["files"].update({"../../../etc/passwd": {"size": 1}})), None),
        (lambda d: rewrite_manifest(d, lambda m: m.update(files=[])), None),
    ],
    ids=[
        "rng",
        "weights",
        "state-not-json",
        "state-not-a-state",
        "state-format",
        "manifest-not-json",
        "manifest-unsafe-path",
        "manifest-shape",
    ],
)
def test_latest_falls_back_to_the_newest_valid_checkpoint(tmp_path, damage, why):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {}, _state(step))
    damage(tmp_path / "checkpoints" / "state_step_20")
    (ckpt, weights, state), passed_over = load_resume_point(tmp_path, "latest")
    assert ckpt.step == 10 and state.trainer["step"] == 10 and torch.equal(weights["w"], torch.full((2,), 10.0))
    if why:
        assert len(passed_over) == 1 and why in passed_over[0] and "state_step_20" in passed_over[0]
        assert passed_over[0].endswith("resuming from an older checkpoint")
    else:
        assert passed_over == [] and [c.step for c in list_checkpoints(tmp_path)] == [10]


def test_no_valid_checkpoint_starts_over_saying_why(tmp_path):
    ckpt = save_checkpoint(tmp_path, 5, {"w": torch.ones(3)}, {}, _state(5))
    flip_last_byte(ckpt.state_dir / "state.json")
    found, passed_over = load_resume_point(tmp_path, "latest")
    assert found is None and len(passed_over) == 1


def test_resume_path_must_be_a_checkpoint_folder(tmp_path):
    with pytest.raises(ConfigError, match="is not a checkpoints/state_step_<N> folder"):
        load_resume_point(tmp_path, str(tmp_path / "nope"))


@pytest.mark.parametrize(
    "manifest, why",
    [
        ({"files": {}}, "lists other files than checkpoint 3 has"),
        ({"files": {"../x": {}}}, "'../x'"),
        ([], "is not a checkpoint manifest"),
        ({"files": "x"}, "is not a checkpoint manifest"),
    ],
)
def test_manifest_problems(manifest, why):
    from lora_trainer.layout import manifest_problem

    assert why in manifest_problem(manifest, 3)


def test_a_manifest_entry_needs_a_size_and_a_sha256():
    from lora_trainer.layout import checkpoint_files, manifest_problem

    good = {"size": 3, "sha256": "a" * 64}
    files = dict.fromkeys(checkpoint_files(3), good)
    assert manifest_problem({"files": files}, 3) is None
    for bad in (
        {"size": -1, "sha256": "a" * 64},
        {"size": True, "sha256": "a" * 64},
        {"size": 3, "sha256": "A" * 64},
        5,
    ):
        assert "no valid size and sha256" in manifest_problem({"files": {**files, checkpoint_files(3)[0]: bad}}, 3)


def test_keep_last_n_prunes_oldest_and_stale_incomplete(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"w": torch.ones(1)}, {}, _state(step))
    (tmp_path / "checkpoints/state_step_2/manifest.json").unlink()
    assert prune_checkpoints(tmp_path, keep=2) == [1, 2]
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == [
        "pytorch_lora_weights_step_3.safetensors",
        "pytorch_lora_weights_step_4.safetensors",
        "state_step_3",
        "state_step_4",
    ]


def test_run_batches_chain_epochs_from_the_resume_point():
    from lora_trainer.data.sampler import RunBatches

    plan = EpochPlan.single(num_items=5, batch_size=2, accumulation=1)
    epochs = [list(EpochBatches(plan, seed=3, epoch=e)) for e in range(3)]
    assert list(RunBatches(plan, seed=3, epochs=3)) == epochs[0] + epochs[1] + epochs[2]
    resumed = RunBatches(plan, seed=3, epochs=3, start_epoch=1, start_batch=2)
    assert list(resumed) == epochs[1][2:] + epochs[2] and len(resumed) == 4
