"""Presets are built once per cache folder, also when the processes of a distributed run ask at once."""

import threading
import time

from lora_trainer import presets


def test_concurrent_builders_build_a_preset_once_and_leave_it_whole(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "text_encoder").mkdir()
        time.sleep(0.2)  # long enough for every other thread to arrive while this one builds
        (folder / "text_encoder" / "model.safetensors").write_bytes(b"weights")

    target = tmp_path / "presets" / "tiny-v2"
    threads = [threading.Thread(target=presets._build_atomically, args=(build, target)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert (target / ".complete").read_text() == presets.PRESET_VERSION
    assert (target / "text_encoder" / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in target.parent.iterdir()) == [".tiny-v2.lock", "tiny-v2"]  # no temp folder left


def test_an_incomplete_leftover_is_replaced(tmp_path):
    target = tmp_path / "tiny-v2"
    (target / "unet").mkdir(parents=True)  # a builder died before the complete marker
    presets._build_atomically(lambda folder: (folder / "vae").mkdir(), target)
    assert sorted(p.name for p in target.iterdir()) == [".complete", "vae"]


def _build_on_rank(rank, size, port, caches, out):
    import os

    import torch.distributed as dist

    os.environ["LORA_CACHE_DIR"] = str(caches / f"rank-{rank}")  # each process a node of its own
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        folder = presets.preset_path("preset:tiny-llm")
        out.put((rank, sorted(p.name for p in folder.glob("*.safetensors"))))
    finally:
        dist.destroy_process_group()


def test_a_preset_built_on_a_node_without_global_rank_0_has_its_weights(tmp_path):
    """transformers' save_pretrained writes weights only on global rank 0 once torch.distributed is
    initialised: the second node's first process (rank 1 here) must still get a whole preset."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_build_on_rank, args=(2, port, tmp_path, queue), nprocs=2, join=True)
    found = dict(queue.get() for _ in range(2))
    assert found[0] == found[1] == ["model.safetensors"]
