"""JSONL datasets for causal-LM LoRA: plain text, prompt+completion, or chat messages.

Each record becomes a text and the character spans that carry loss (the whole text; the completion;
the assistant turns). Tokenizing the whole text once with offsets and labelling the tokens inside those
spans keeps masks exact at BPE boundaries, for any chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DatasetError

IGNORE_INDEX = -100
FORMAT_KEYS = {"chat": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizedDataset:
    examples: list[Example]
    records: int
    format: str
    truncated: int = 0
    dropped: int = 0  # no loss token left after truncation
    longest: int = 0
    lengths: list[int] = field(default_factory=list)

    def truncation_report(self, max_seq_length: int) -> str | None:
        if not self.truncated:
            return None
        report = (
            f"{self.truncated} of {self.records} record(s) were longer than max_seq_length={max_seq_length} "
            f"tokens and were truncated (longest: {self.longest} tokens)"
        )
        if self.dropped:
            report += f"; {self.dropped} of them kept no trainable token and were dropped"
        return report


def jsonl_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise DatasetError(f"train_data_dir {path} holds no .jsonl files")
        return files
    raise DatasetError(f"train_data_dir {path} does not exist")


def read_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) pairs, `where` being 'file:line' for error messages."""
    out = []
    for file in jsonl_files(path):
        try:
            # lines end at "\n" only: JSON strings may hold U+2028 and other characters str.splitlines splits at
            # (utf-8-sig: a byte-order mark that Windows tools write at the start is not part of the first line)
            lines = [line.rstrip("\r") for line in file.read_text(encoding="utf-8-sig").split("\n")]
        except (OSError, UnicodeDecodeError) as err:
            raise DatasetError(f"{file} cannot be read: {err}") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{file}:{number}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise DatasetError(f"{file}:{number}: JSON nested too deeply to read") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{file}:{number}: each line must be a JSON object")
            out.append((f"{file}:{number}", record))
    if not out:
        raise DatasetError(f"train_data_dir {path} holds no records")
    return out


def detect_format(record: dict[str, Any], where: str) -> str:
    for fmt, keys in FORMAT_KEYS.items():
        if all(k in record for k in keys):
            return fmt
    raise DatasetError(
        f"{where}: cannot tell the record format from keys {sorted(record)}; expected "
        '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}'
    )


def loss_spans(record: dict[str, Any], fmt: str, where: str, render_chat) -> tuple[str, list[tuple[int, int]]]:
    """The record's full text and the (start, end) character spans trained on."""
    missing = [k for k in FORMAT_KEYS[fmt] if k not in record]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {', '.join(missing)} for dataset_format={fmt}")
    if fmt == "text":
        text = _string(record["text"], "text", where)
        return text, [(0, len(text))]
    if fmt == "prompt_completion":
        prompt = _string(record["prompt"], "prompt", where)
        completion = _string(record["completion"], "completion", where)
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
    return chat_spans(_messages(record["messages"], where), render_chat, where)


def chat_spans(messages: list[dict[str, str]], render_chat, where: str) -> tuple[str, list[tuple[int, int]]]:
    """Assistant turns' spans, found by rendering the conversation one turn at a time."""
    full = render_chat(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(messages[:i], True) if i else render_chat([], True)
        upto = render_chat(messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DatasetError(
                f"{where}: the chat template does not render turn by turn; cannot mask non-assistant turns"
            )
        spans.append((len(before), len(upto)))
    if not spans:
        raise DatasetError(f"{where}: the conversation has no assistant message to train on")
    return full, spans


def _string(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: '{key}' must be a non-empty string")
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatasetError(f"{where}: messages[{i}] needs string 'role' and 'content'")
    return value


def tokenize_dataset(path: str | Path, tokenizer, fmt: str, max_seq_length: int) -> TokenizedDataset:
    """Tokenizes every record; with fmt='auto' each record's format is read from its keys."""
    records = read_jsonl(path)
    formats = [detect_format(r, where) if fmt == "auto" else fmt for where, r in records]
    if "chat" in formats and not getattr(tokenizer, "chat_template", None):
        raise DatasetError("chat records need a tokenizer with a chat template; the base model's has none")

    def render_chat(messages, add_generation_prompt):
        if not messages and not add_generation_prompt:
            return ""
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    counts = {f: formats.count(f) for f in dict.fromkeys(formats)}
    out = TokenizedDataset(examples=[], records=len(records), format=", ".join(f"{f}: {n}" for f, n in counts.items()))
    longest_token = max((len(t) for t in tokenizer.get_vocab()), default=1)
    for (where, record), record_format in zip(records, formats):
        text, spans = loss_spans(record, record_format, where, render_chat)
        text, spans = bounded(text, spans, (max_seq_length + 1) * longest_token)
        example, length = tokenize_with_spans(text, spans, tokenizer, append_eos=record_format != "chat")
        out.lengths.append(length)
        if length > max_seq_length:
            out.truncated += 1
            out.longest = max(out.longest, length)
            example = Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length])
        if all(label == IGNORE_INDEX for label in example.labels):
            out.dropped += 1
            continue
        out.examples.append(example)
    if not out.examples:
        raise DatasetError(f"no record of {path} keeps a trainable token within max_seq_length={max_seq_length}")
    return out


def bounded(text: str, spans: list[tuple[int, int]], limit: int) -> tuple[str, list[tuple[int, int]]]:
    """The text cut to `limit` characters: no token past them can be among the first max_seq_length (the
    limit allows every token the vocabulary's longest), so a record of megabytes is never tokenized whole
    (memory stays what max_seq_length implies). A cut record is still reported as truncated."""
    if len(text) <= limit:
        return text, spans
    return text[:limit], [(s, min(e, limit)) for s, e in spans if s < limit]


def tokenize_with_spans(text: str, spans, tokenizer, append_eos: bool) -> tuple[Example, int]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    labels = [tid if any(s <= start < e for s, e in spans) else IGNORE_INDEX for tid, (start, _) in zip(ids, offsets)]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE_INDEX] + labels
    if append_eos and tokenizer.eos_token_id is not None:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return Example(ids, labels), len(ids)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> Example:
        return self.examples[key[0]]


def collate_tokens(pad_id: int):
    def collate(items: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(i.input_ids) for i in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item.input_ids)
            ids[row, :n] = torch.tensor(item.input_ids)
            labels[row, :n] = torch.tensor(item.labels)
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate
