"""`preset:tiny-blip`: a BLIP captioner built locally (random weights, real architecture and processor).

It exercises the same code path as Salesforce/blip-image-captioning-base: AutoProcessor (BLIP image
processor + BERT tokenizer with the [DEC] decoder-start token), AutoModelForImageTextToText, generate.
Its captions are words drawn from a small vocabulary, different per image; special tokens are biased away
so that generation runs to max_new_tokens and the captions are never empty.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = [
    "a",
    "an",
    "the",
    "photo",
    "picture",
    "drawing",
    "of",
    "with",
    "on",
    "in",
    "and",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "circle",
    "square",
    "shape",
    "dog",
    "cat",
    "person",
    "tree",
    "house",
    "sky",
    "small",
    "large",
    "bright",
    "dark",
]


def write_tiny_bert_tokenizer(folder: Path):
    """A BERT WordPiece tokenizer (BLIP's) over a few words and the letters; returns it."""
    from transformers import BertTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = SPECIALS + WORDS + [c for c in letters if c not in WORDS] + [f"##{c}" for c in letters]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, bos_token="[DEC]", model_max_length=64)
    (folder / "vocab.txt").unlink()  # save_pretrained writes its own files
    return tokenizer


def build_tiny_blip(folder: Path) -> None:
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokenizer = write_tiny_bert_tokenizer(folder)
    ids = tokenizer.convert_tokens_to_ids
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            encoder_hidden_size=32,
            bos_token_id=ids("[DEC]"),
            pad_token_id=ids("[PAD]"),
            sep_token_id=ids("[SEP]"),
            eos_token_id=ids("[SEP]"),
            initializer_range=0.2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            initializer_range=0.2,
        ),
        projection_dim=32,
        initializer_range=0.2,  # wide init: captions that differ from image to image
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # words only: never stop early, never emit a special token
        bias = model.text_decoder.cls.predictions.bias
        bias[[ids(t) for t in SPECIALS]] = -1e4
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    processor.save_pretrained(folder)
    model.save_pretrained(folder, safe_serialization=True)
