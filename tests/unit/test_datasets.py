"""Dataset validation and tokenization: every bad dataset names its problem; masks are exact."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_trainer.data.cache import TensorCache
from lora_trainer.data.images import (
    assign_bucket,
    bucket_sizes,
    load_image,
    resize_and_crop,
    scan_image_folder,
    to_tensor,
)
from lora_trainer.data.text import IGNORE_INDEX, collate_tokens, read_jsonl, tokenize_dataset
from lora_trainer.errors import DatasetError
from lora_trainer.presets import preset_path


def make_images(folder: Path, names=("a.png", "b.jpg"), size=(40, 24)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (i * 60, 100, 200)).save(folder / name)


def write_csv(folder: Path, rows: list[str], header="file_name,text") -> None:
    (folder / "metadata.csv").write_text("\n".join([header, *rows]) + "\n")


def test_metadata_csv_captions(tmp_path):
    make_images(tmp_path)
    write_csv(tmp_path, ["a.png,a red thing", 'b.jpg,"a blue, big thing"'])
    scan = scan_image_folder(tmp_path)
    assert [(r.path.name, r.caption) for r in scan.records] == [
        ("a.png", "a red thing"),
        ("b.jpg", "a blue, big thing"),
    ]
    assert scan.caption_source == "metadata.csv" and scan.sizes == [(40, 24), (40, 24)]


def test_txt_captions_beside_images(tmp_path):
    make_images(tmp_path)
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta")
    scan = scan_image_folder(tmp_path)
    assert [r.caption for r in scan.records] == ["alpha", "beta"] and scan.caption_source == ".txt files"


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "holds no images"),
        (
            lambda d: (make_images(d), (d / "a.txt").write_text("x")),
            r"1 of 2 image\(s\) have no caption in .txt files: b.jpg",
        ),
        (
            lambda d: (make_images(d), write_csv(d, ["a.png,x", "c.png,y"])),
            r"lists 1 image\(s\) that do not exist: c.png",
        ),
        (lambda d: (make_images(d), write_csv(d, ["a.png,x"], header="image,caption")), "missing column"),
        (lambda d: (make_images(d), write_csv(d, ["../secret.png,x"])), "outside train_data_dir"),
        (lambda d: (make_images(d), write_csv(d, ["a.png,x", "b.jpg,"])), "have no caption in metadata.csv: b.jpg"),
        (
            lambda d: (make_images(d), write_csv(d, ["a.png,x", "b.jpg,y"]), (d / "b.jpg").write_bytes(b"not a jpeg")),
            r"1 image\(s\) cannot be read: b.jpg",
        ),
    ],
    ids=[
        "missing-dir",
        "empty",
        "txt-missing",
        "csv-missing-file",
        "csv-columns",
        "escape",
        "csv-empty-caption",
        "corrupt-image",
    ],
)
def test_bad_image_folders(tmp_path, setup, message):
    folder = tmp_path / "data"
    setup(folder)
    with pytest.raises(DatasetError, match=message):
        scan_image_folder(folder)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels in a few bytes: what a decompression bomb looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_a_dataset_error_naming_the_file(tmp_path):
    make_images(tmp_path, names=("a.png",))
    png_header_only(tmp_path / "bomb.png", 60_000, 60_000)
    write_csv(tmp_path, ["a.png,x", "bomb.png,y"])
    with pytest.raises(DatasetError, match=r"1 image\(s\) cannot be read: bomb.png.*DecompressionBombError"):
        scan_image_folder(tmp_path)


@pytest.mark.parametrize("linked", ["image", "caption"])
def test_txt_mode_refuses_symlinks_that_leave_the_dataset(tmp_path, linked):
    outside = tmp_path / "outside"
    make_images(outside, names=("secret.png",))
    (outside / "secret.txt").write_text("a private caption")
    data = tmp_path / "data"
    make_images(data, names=("a.png",))
    (data / "a.txt").write_text("alpha")
    if linked == "image":
        (data / "b.png").symlink_to(outside / "secret.png")
        (data / "b.txt").write_text("beta")
    else:
        (data / "a.txt").unlink()
        (data / "a.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(DatasetError, match="symbolic links lead outside it: (a|b).png"):
        scan_image_folder(data)


def test_txt_mode_follows_symlinks_inside_the_dataset(tmp_path):
    make_images(tmp_path, names=("a.png",))
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "b.txt").symlink_to(tmp_path / "a.txt")
    assert [r.caption for r in scan_image_folder(tmp_path).records] == ["alpha", "alpha"]


def test_truncated_image_file_is_reported(tmp_path):
    make_images(tmp_path, names=("a.png",), size=(64, 64))
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    write_csv(tmp_path, ["a.png,x"])
    with pytest.raises(DatasetError, match="cannot be read: a.png"):
        scan_image_folder(tmp_path)


def test_resize_and_crop_are_seeded():
    image = Image.effect_noise((80, 50), 40).convert("RGB")
    a, crop_a = resize_and_crop(image, (32, 32), center_crop=False, flip=True, rng=random.Random(3))
    b, crop_b = resize_and_crop(image, (32, 32), center_crop=False, flip=True, rng=random.Random(3))
    assert a.size == (32, 32) and a.tobytes() == b.tobytes() and crop_a == crop_b
    assert crop_a.original_size == (50, 80)
    t = to_tensor(a)
    assert t.shape == (3, 32, 32) and t.min() >= -1.0 and t.max() <= 1.0


@pytest.mark.parametrize("orientation, size", [(1, (40, 24)), (6, (24, 40)), (3, (40, 24))])
def test_images_are_turned_upright_by_their_exif_orientation(tmp_path, orientation, size):
    picture = Image.new("RGB", (40, 24), (10, 20, 30))
    picture.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    picture.save(tmp_path / "a.png", exif=exif)
    image = load_image(tmp_path / "a.png")
    red = [xy for xy in ((0, 0), (size[0] - 1, 0), (size[0] - 1, size[1] - 1)) if image.getpixel(xy) == (255, 0, 0)]
    assert image.mode == "RGB" and image.size == size
    assert red == [{1: (0, 0), 6: (size[0] - 1, 0), 3: (size[0] - 1, size[1] - 1)}[orientation]]


def test_feature_cache_keeps_what_it_read_in_memory_up_to_its_budget(tmp_path):
    cache = TensorCache(tmp_path, memory_budget=3 * 16)  # three entries of 16 bytes
    for i in range(4):
        cache.put(f"{i:02d}key", {"x": torch.full((4,), float(i))})
    assert [cache.get(f"{i:02d}key")["x"][0].item() for i in range(4)] == [0, 1, 2, 3]
    assert list(cache.kept) == ["00key", "01key", "02key"] and cache.kept_bytes == 48
    cache.path("01key").unlink()
    cache.path("03key").unlink()
    assert cache.get("01key")["x"][0] == 1  # served from memory, no file read
    assert cache.get("03key") is None  # over the budget: read from disk each time
    assert pickle.loads(pickle.dumps(cache)).kept == {}  # a spawned loader worker starts empty


def test_loader_workers_keep_no_feature_cache_entries(tmp_path):
    cache = TensorCache(tmp_path)
    cache.put("00key", {"x": torch.ones(2)})

    class Reads(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            cache.get("00key")
            return torch.tensor(len(cache.kept))

    kept = torch.cat(list(torch.utils.data.DataLoader(Reads(), num_workers=1)))
    assert kept.tolist() == [0, 0] and cache.kept == {}


@pytest.mark.parametrize(
    "size, target, top_left",
    [((80, 40), (32, 32), (0, 16)), ((40, 80), (32, 32), (16, 0)), ((64, 32), (48, 24), (0, 0))],  # scale, then center,
)
def test_center_crop_corner_and_rectangular_targets(size, target, top_left):
    image, crop = resize_and_crop(Image.new("RGB", size), target, center_crop=True, flip=False, rng=random.Random(0))
    assert image.size == target and crop.top_left == top_left and crop.original_size == size[::-1]


def test_buckets_follow_kohya_rules_and_fit_the_shape():
    buckets = bucket_sizes(512, 256, 1024, 64)
    assert (512, 512) in buckets and all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(w * h <= 512 * 512 and min(w, h) >= 256 and max(w, h) <= 1024 for w, h in buckets)
    assert assign_bucket((1000, 1000), buckets) == (512, 512)
    assert assign_bucket((1920, 1080), buckets) == (640, 384)  # 1.78 -> 1.67, the closest shape
    assert assign_bucket((1080, 1920), buckets) == (384, 640)


@pytest.fixture(scope="module")
def llm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(preset_path("preset:tiny-llm"))


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def decoded_labels(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_prompt_completion_trains_on_the_completion_only(tmp_path, llm_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    data = tokenize_dataset(path, llm_tokenizer, "auto", 64)
    assert data.format == "prompt_completion: 1"
    assert decoded_labels(llm_tokenizer, data.examples[0]) == " 4</s>"


def test_chat_trains_on_assistant_turns_only(tmp_path, llm_tokenizer):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"},
        ]
    }
    data = tokenize_dataset(write_jsonl(tmp_path / "c.jsonl", [record]), llm_tokenizer, "chat", 256)
    assert decoded_labels(llm_tokenizer, data.examples[0]) == "hello<|im_end|>\nciao<|im_end|>\n"


def test_plain_text_trains_on_everything(tmp_path, llm_tokenizer):
    data = tokenize_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}]), llm_tokenizer, "text", 64)
    assert decoded_labels(llm_tokenizer, data.examples[0]) == "abc</s>"


def test_truncation_is_counted_and_reported(tmp_path, llm_tokenizer):
    records = [{"text": "x" * 100}, {"text": "short"}, {"prompt": "p" * 50, "completion": "c"}]
    data = tokenize_dataset(write_jsonl(tmp_path / "t.jsonl", records), llm_tokenizer, "auto", 20)
    assert (data.truncated, data.dropped, data.longest, len(data.examples)) == (2, 1, 101, 2)
    report = data.truncation_report(20)
    assert "2 of 3 record(s) were longer than max_seq_length=20 tokens" in report
    assert "longest: 101 tokens" in report and "1 of them kept no trainable token" in report


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path, llm_tokenizer):
    """U+2028, U+2029, U+0085, form feed are valid inside JSON strings; only "\\n" ends a JSONL line."""
    text = "one\u2028two\u2029three\x85four\x0cfive\x1cend"
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\r\n" + json.dumps({"text": "b"}) + "\n")
    assert [record for _, record in read_jsonl(path)] == [{"text": text}, {"text": "b"}]


def test_a_huge_record_is_cut_before_tokenizing(tmp_path, llm_tokenizer, monkeypatch):
    """Memory follows max_seq_length, not the record: the tokenizer never sees the whole 5 MB line."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p " * 2_500_000, "completion": "c"}, {"text": "short"}])
    seen = []
    real_call = type(llm_tokenizer).__call__
    monkeypatch.setattr(
        type(llm_tokenizer), "__call__", lambda self, text, **kw: seen.append(len(text)) or real_call(self, text, **kw)
    )
    data = tokenize_dataset(path, llm_tokenizer, "auto", 32)
    longest_token = max(len(t) for t in llm_tokenizer.get_vocab())
    assert max(seen) <= 33 * longest_token < 100_000
    assert (data.truncated, data.dropped, len(data.examples)) == (1, 1, 1)
    assert data.longest > 32 and "1 of 2 record(s) were longer than max_seq_length=32" in data.truncation_report(32)


@pytest.mark.parametrize(
    "lines, fmt, message",
    [
        (['{"text": "a"}', "{not json"], "auto", r"t.jsonl:2: not valid JSON"),
        (['{"question": "a"}'], "auto", "cannot tell the record format from keys"),
        (['{"text": "a"}'], "prompt_completion", "missing key"),
        (['{"prompt": "a", "completion": 3}'], "auto", "'completion' must be a non-empty string"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], "auto", "has no assistant message"),
        (["[1, 2]"], "auto", "each line must be a JSON object"),
        ([""], "auto", "holds no records"),
    ],
)
def test_bad_jsonl(tmp_path, llm_tokenizer, lines, fmt, message):
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    with pytest.raises(DatasetError, match=message):
        tokenize_dataset(path, llm_tokenizer, fmt, 64)


def test_jsonl_folder_without_files(tmp_path):
    with pytest.raises(DatasetError, match="holds no .jsonl files"):
        read_jsonl(tmp_path)


def test_collate_pads_and_masks():
    from lora_trainer.data.text import Example

    batch = collate_tokens(pad_id=0)([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
