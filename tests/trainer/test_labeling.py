"""lora-label and auto_label with a real (tiny, locally built) BLIP: captions what is missing, keeps what
exists, skips and lists unreadable images, writes metadata.csv atomically, and trains from the result."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lora_trainer.config import build_config, config_from_spec
from lora_trainer.data.images import list_images, load_image, read_metadata_csv
from lora_trainer.errors import ExitCode
from lora_trainer.labeling.captioner import DEFAULT_LABEL_MODEL, Captioner
from lora_trainer.labeling.cli import main
from lora_trainer.labeling.core import caption_images, compose
from lora_trainer.observers import BaseObserver

from .conftest import SAMPLE, SD_BASE, run

BLIP = "preset:tiny-blip"


@pytest.fixture
def images(tmp_path) -> Path:
    """The eight sample images without captions, one of them corrupt, one with a .txt caption."""
    data = tmp_path / "images"
    shutil.copytree(SAMPLE / "images", data)
    (data / "metadata.csv").unlink()
    (data / "blue_circle.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (data / "red_square.txt").write_text("my own caption, kept\n")
    return data


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    """What the tiny BLIP says for each sample image on its own (batching must not change or shuffle it)."""
    model = Captioner(BLIP, max_new_tokens=40)
    return {p.name: model.caption([load_image(p)])[0] for p in list_images(SAMPLE / "images")}


@pytest.mark.parametrize(
    "caption, prefix, suffix, expected",
    [
        ("a dog", "", "", "a dog"),
        ("a dog", "sks", "", "sks, a dog"),
        ("a dog", "", "photo", "a dog, photo"),
        ("sks, a dog", "sks", "", "sks, a dog"),  # never twice
        ("  a dog ", "sks", "best quality", "sks, a dog, best quality"),
    ],
)
def test_compose(caption, prefix, suffix, expected):
    assert compose(caption, prefix, suffix) == expected


def test_the_default_model_is_blip_base():
    assert DEFAULT_LABEL_MODEL == "Salesforce/blip-image-captioning-base"
    assert build_config({**SD_BASE}).label_model == DEFAULT_LABEL_MODEL


def test_lora_label_captions_the_missing_skips_the_corrupt_and_keeps_the_rest(images, reference, capsys):
    code = main(["--input", str(images), "--model", BLIP, "--trigger-word", "sks", "--batch-size", "3"])
    assert code == ExitCode.OK
    out, err = capsys.readouterr()
    assert "6 captioned, 1 kept, 1 skipped" in out
    assert "blue_circle.png" in err and "cannot be read" in err
    rows = read_metadata_csv(images / "metadata.csv", "file_name", "text")
    assert sorted(rows) == sorted(p.name for p in list_images(images) if p.name != "blue_circle.png")
    assert rows["red_square.png"] == "my own caption, kept"
    for name, text in rows.items():
        if name != "red_square.png":
            assert text == f"sks, {reference[name]}"
    assert len(set(rows.values())) == len(rows)  # image-specific captions, in the right rows
    assert not list(images.glob(".*.tmp"))


def test_a_second_run_captions_nothing_and_never_loads_a_model(images, capsys):
    assert main(["--input", str(images), "--model", BLIP]) == ExitCode.OK
    before = (images / "metadata.csv").read_bytes()
    # the unreadable image is still there (and listed), but nothing else needs a model
    (images / "blue_circle.png").unlink()
    assert main(["--input", str(images), "--model", "/no/such/model"]) == ExitCode.OK
    assert "0 captioned, 7 kept, 0 skipped" in capsys.readouterr().out
    assert (images / "metadata.csv").read_bytes() == before


def test_overwrite_recaptions_everything(images, reference, capsys):
    (images / "blue_circle.png").unlink()
    assert (
        main(
            [
                "--input",
                str(images),
                "--model",
                BLIP,
                "--overwrite",
                "--suffix",
                "tiny",
                "--output",
                str(images / "captions.csv"),
            ]
        )
        == ExitCode.OK
    )
    rows = read_metadata_csv(images / "captions.csv", "file_name", "text")
    assert rows["red_square.png"] == f"{reference['red_square.png']}, tiny"
    assert "7 captioned, 0 kept" in capsys.readouterr().out


def test_settings_come_from_a_training_config_and_flags_win(images, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({**SD_BASE, "label_model": BLIP, "trigger_word": "cfgword", "label_batch_size": 2}))
    assert main(["--input", str(images), "--config", str(cfg)]) == ExitCode.OK
    rows = read_metadata_csv(images / "metadata.csv", "file_name", "text")
    assert rows["red_circle.png"].startswith("cfgword, ")
    assert main(["--input", str(images), "--config", str(cfg), "--prefix", "flagword", "--overwrite"]) == ExitCode.OK
    assert read_metadata_csv(images / "metadata.csv", "file_name", "text")["red_circle.png"].startswith("flagword, ")


def build_tiny_git(folder: Path) -> None:
    """A second architecture (GIT: CLIP vision tower + causal text decoder) through the same code path."""
    import torch
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    from lora_trainer.presets.blip import SPECIALS, write_tiny_bert_tokenizer

    tokenizer = write_tiny_bert_tokenizer(folder)
    ids = tokenizer.convert_tokens_to_ids
    config = GitConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            initializer_range=0.2,
        ),
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=ids("[CLS]"),
        eos_token_id=ids("[SEP]"),
        pad_token_id=ids("[PAD]"),
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = GitForCausalLM(config)
    with torch.no_grad():
        model.output.bias[[ids(t) for t in SPECIALS]] = -1e4
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor, tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)


def test_another_captioning_model_by_flag(images, tmp_path):
    build_tiny_git(tmp_path / "git")
    assert main(["--input", str(images), "--model", str(tmp_path / "git"), "--max-new-tokens", "5"]) == ExitCode.OK
    rows = read_metadata_csv(images / "metadata.csv", "file_name", "text")
    model = Captioner(str(tmp_path / "git"), max_new_tokens=5)
    assert rows["green_square.png"] == model.caption([load_image(images / "green_square.png")])[0]
    assert type(model.model).__name__ == "GitForCausalLM"


@pytest.mark.parametrize(
    "setup, args, code, message",
    [
        (lambda d: [p.unlink() for p in d.iterdir()], [], ExitCode.DATASET_INVALID, "holds no images"),
        (
            lambda d: None,
            ["--model", "no-org/no-such-captioner"],
            ExitCode.MODEL_INVALID,
            "cannot load the captioning model no-org/no-such-captioner",
        ),
        (lambda d: None, ["--batch-size", "0"], ExitCode.CONFIG_INVALID, "--batch-size must be"),
        (
            lambda d: [p.write_bytes(b"junk") for p in d.glob("*.png")],
            ["--model", BLIP],
            ExitCode.DATASET_INVALID,
            "could be captioned",
        ),
    ],
)
def test_bad_labeling_runs_name_the_problem(images, capsys, monkeypatch, setup, args, code, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (images / "red_square.txt").unlink()
    setup(images)
    assert main(["--input", str(images), *args]) == code
    assert message in capsys.readouterr().err


class FlakyModel:
    """Fails any batch holding the 'poison' image: only that image may be lost."""

    def __init__(self, poison_size: tuple[int, int]):
        self.poison, self.calls = poison_size, []

    def caption(self, batch):
        self.calls.append(len(batch))
        if any(image.size == self.poison for image in batch):
            raise RuntimeError("CUDA error: an illegal memory access")
        return [f"image {image.size[0]}" for image in batch]


def test_a_failing_batch_is_retried_one_image_at_a_time(tmp_path):
    from PIL import Image

    paths = []
    for i, width in enumerate([10, 11, 12, 13, 14]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (width, 8)).save(paths[-1])
    model = FlakyModel((12, 8))
    captions, failed = caption_images(paths, model, batch_size=4)
    assert [captions[p] for p in paths if p in captions] == ["image 10", "image 11", "image 13", "image 14"]
    assert [(p.name, "CUDA error" in why) for p, why in failed] == [("2.png", True)]
    assert model.calls == [4, 1, 1, 1, 1, 1]


# -- auto_label in a training run
def test_manifest_maps_auto_label():
    spec = {
        "dataset": {
            "uri": "s3://b/d",
            "autoLabel": True,
            "labelModel": "m",
            "captionPrefix": "sks",
            "captionSuffix": "s",
        }
    }
    assert {k: v for k, v in config_from_spec(spec).items() if "label" in k or "caption_" in k} == {
        "auto_label": True,
        "label_model": "m",
        "caption_prefix": "sks",
        "caption_suffix": "s",
    }


def test_auto_label_captions_only_what_is_missing_then_trains(images, reference, tmp_path):
    (images / "blue_circle.png").unlink()
    recipe = run(
        SD_BASE,
        tmp_path / "out",
        train_data_dir=str(images),
        auto_label=True,
        label_model=BLIP,
        caption_prefix="sks",
        max_train_steps=2,
        save_steps=0,
    )
    rows = read_metadata_csv(images / "metadata.csv", "file_name", "text")
    assert len(rows) == 7 and rows["red_square.png"] == "my own caption, kept"
    assert rows["green_circle.png"] == f"sks, {reference['green_circle.png']}"
    assert {r.caption for r in recipe.task.records} == set(rows.values())  # it trained on these captions
    source = recipe.summary.data_summary["caption_source"]
    assert "auto_label: 6 captioned by preset:tiny-blip" in source and str(images / "metadata.csv") in source
    assert "auto_label: 6 captioned" in (tmp_path / "out" / "EXPERIMENT.md").read_text()
    # a second run finds every caption in place: nothing to caption, metadata.csv unchanged
    before = (images / "metadata.csv").read_bytes()
    again = run(
        SD_BASE,
        tmp_path / "again",
        train_data_dir=str(images),
        auto_label=True,
        label_model="no-org/never-loaded",
        max_train_steps=1,
        save_steps=0,
    )
    assert again.summary.data_summary["caption_source"] == "metadata.csv"
    assert (images / "metadata.csv").read_bytes() == before


def test_auto_label_progress_reaches_the_observers_before_training(images, tmp_path):
    (images / "blue_circle.png").unlink()
    heard = []

    class Recorder(BaseObserver):
        def on_labeling(self, done, total):
            heard.append((done, total))

        def on_start(self, info):
            heard.append("training")

    run(
        SD_BASE,
        tmp_path / "out",
        observers=[Recorder()],
        train_data_dir=str(images),
        auto_label=True,
        label_model=BLIP,
        label_batch_size=4,
        max_train_steps=1,
        save_steps=0,
    )
    assert heard == [(0, 6), (4, 6), (6, 6), "training"]  # 0 first: the model is still loading then


def test_dataset_read_only_keeps_auto_label_out_of_a_writable_dataset(images, reference, tmp_path):
    (images / "blue_circle.png").unlink()
    before = sorted(p.name for p in images.iterdir())
    recipe = run(
        SD_BASE,
        tmp_path / "out",
        train_data_dir=str(images),
        auto_label=True,
        label_model=BLIP,
        dataset_read_only=True,
        max_train_steps=1,
        save_steps=0,
    )
    assert sorted(p.name for p in images.iterdir()) == before
    rows = read_metadata_csv(tmp_path / "out" / "metadata.csv", "file_name", "text")
    assert len(rows) == 7 and rows["red_circle.png"] == reference["red_circle.png"]
    assert recipe.summary.data_summary["caption_source"].endswith("(in output_dir/metadata.csv)")


def can_mount_read_only() -> bool:
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount --bind -o ro /tmp /tmp && true"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    shutil.which("unshare") is None or not can_mount_read_only(),
    reason="needs unshare and mount (a private mount namespace) to make a read-only folder",
)
def test_auto_label_writes_into_output_dir_when_the_dataset_is_read_only(images, reference, tmp_path):
    """The dataset is mounted read-only (root ignores permission bits, so chmod would prove nothing)."""
    (images / "blue_circle.png").unlink()
    out = tmp_path / "out"
    out.mkdir()
    config = {**SD_BASE, "train_data_dir": str(images), "output_dir": str(out), "auto_label": True, "label_model": BLIP}
    script = textwrap.dedent(f"""
        from lora_trainer.config import build_config
        from lora_trainer.labeling.auto import scan_captioned_folder
        print(scan_captioned_folder(build_config({config!r})).caption_source)
    """)
    command = f'mount --bind -o ro {images} {images} && exec {sys.executable} -c "$SCRIPT"'
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", command],
        env={**__import__("os").environ, "SCRIPT": script},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert not (images / "metadata.csv").exists()
    rows = read_metadata_csv(out / "metadata.csv", "file_name", "text")
    assert len(rows) == 7 and rows["red_square.png"] == "my own caption, kept"
    assert rows["red_circle.png"] == reference["red_circle.png"]
    assert "(in output_dir/metadata.csv)" in result.stdout
    # a restarted attempt reuses those captions instead of captioning again (same text, no model)
    from lora_trainer.labeling.auto import scan_captioned_folder

    scan = scan_captioned_folder(build_config({**config, "label_model": "no-org/never-loaded"}))
    assert "6 from an earlier attempt" in scan.caption_source
    assert {r.path.name: r.caption for r in scan.records} == rows
