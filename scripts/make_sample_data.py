"""Regenerates the bundled sample data (trainer_image/lora_trainer/sample_data). Deterministic."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1] / "trainer_image" / "lora_trainer" / "sample_data"
COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 70), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square")


def draw(shape: str, color: tuple[int, int, int], background: tuple[int, int, int], size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (pen.ellipse if shape == "circle" else pen.rectangle)(box, fill=color)
    return image


def make_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        for j, shape in enumerate(SHAPES):
            background = (245, 245, 240) if (i + j) % 2 == 0 else (30, 30, 35)
            file_name = f"{name}_{shape}.png"
            draw(shape, rgb, background).save(folder / file_name, optimize=True)
            shade = "light" if background[0] > 128 else "dark"
            rows.append((file_name, f"a {name} {shape} on a {shade} background, flat icon"))
    with (folder / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)


def make_text(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = []
    for _ in range(48):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        lines.append({"prompt": f"Q: What is {a} plus {b}?\nA:", "completion": f" {a + b}"})
    (folder / "arithmetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    chats = []
    for name, rgb in COLORS.items():
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": f"Give the RGB value of {name}."},
                    {"role": "assistant", "content": f"{name} is rgb{rgb}."},
                ]
            }
        )
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))


if __name__ == "__main__":
    make_images(ROOT / "images")
    make_text(ROOT / "text")
    print(f"wrote {ROOT}")
