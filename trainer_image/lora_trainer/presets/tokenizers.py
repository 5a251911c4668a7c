"""Tokenizers for the tiny presets, built from in-memory vocabularies (no hub): character-level, real classes."""

from __future__ import annotations

import json
from pathlib import Path


def byte_unicode_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode alphabet: 256 printable characters, one per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> int:
    """A character-level CLIP BPE tokenizer (no merges); returns its vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_unicode_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
    )
    tokenizer.save_pretrained(folder)
    return len(tokens)


def write_tiny_t5_tokenizer(folder: Path, model_max_length: int = 512) -> int:
    """A character-level T5 (Unigram) tokenizer: <pad>=0, </s>=1, <unk>=2, printable ASCII with and without
    the word-start mark, and T5's 100 sentinel tokens; returns its vocabulary size."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for code in range(32, 127):
        pieces += [(chr(code), -3.0), ("\u2581" + chr(code), -2.5)]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return len(pieces)


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template for text: with enable_thinking false, an empty think block after the assistant turn
QWEN3_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for c in m['content'] -%}{%- if c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}{%- endif -%}"
)


def write_tiny_qwen_tokenizer(folder: Path) -> int:
    """A byte-level Qwen2 BPE tokenizer (no merges) with Qwen's special tokens and a Qwen3-style chat
    template; <|endoftext|> pads. Returns its vocabulary size."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(byte_unicode_alphabet())}
    vocab.update({t: len(vocab) + i for i, t in enumerate(QWEN_SPECIALS)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=131072, pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return len(vocab)
