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
