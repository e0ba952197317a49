"""Training data: load records, render them with a template, mask prompts, and batch or pack them.

Formats: Alpaca JSON/JSONL (`instruction`, `input`, `output`), chat JSONL (`messages`), plain text
(WikiText-2 style, cut into blocks of --max-length tokens). Built in: `alpaca`, `wikitext2`.
Bad input raises `DataError` naming the file, line and field. Nothing is dropped silently:
truncated and skipped samples are counted in `DataStats`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafit.base.errors import DataError

DATASET_DIR = Path(__file__).parent / "datasets"
BUILTIN = {
    "alpaca": DATASET_DIR / "alpaca_en_demo.json",
    "wikitext2": DATASET_DIR / "wikitext-2" / "valid.txt",
}
TEXT_SUFFIXES = (".txt", ".text", ".raw", ".md")
IGNORE = -100  # label of tokens that carry no loss (the convention of torch's cross_entropy)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass
class Record:
    """One raw training example and where it came from."""

    fields: dict[str, Any]
    file: str
    line: int


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token carries no loss

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    file: str
    format: str
    template: str
    records: int = 0
    samples: int = 0
    truncated: int = 0
    skipped_no_loss: int = 0
    tokens: int = 0
    loss_tokens: int = 0


# ---------------------------------------------------------------- loading


def resolve_path(data: str) -> Path:
    path = BUILTIN.get(data) or Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data not found; use {' or '.join(BUILTIN)} or a .json/.jsonl/.txt file", file=data)
    if path.is_dir():
        raise DataError("expected a file, got a directory", file=str(path))
    return path


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror}", file=str(path)) from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {e.start})", file=str(path), line=line) from e


def detect_format(path: Path, records: list[Record]) -> str:
    if path.suffix in TEXT_SUFFIXES:
        return "text"
    return "chat" if records and "messages" in records[0].fields else "alpaca"


def _json_array_records(text: str, file: str) -> list[Record]:
    """Parse a JSON array of objects, remembering the line each object starts on."""
    decoder = json.JSONDecoder()
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", file=file, line=e.lineno) from e
    start = text.index("[") + 1 if text.lstrip().startswith("[") else None
    if start is None:
        raise DataError("a .json data file must hold a list of records (or use .jsonl)", file=file, line=1)
    records, i = [], start
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return records
        value, end = decoder.raw_decode(text, i)
        records.append(Record(value, file, text.count("\n", 0, i) + 1))
        i = end


def _jsonl_records(text: str, file: str) -> list[Record]:
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(Record(json.loads(line), file, n))
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", file=file, line=n) from e
    return records


def load_records(data: str, fmt: str = "auto") -> tuple[list[Record] | str, Path, str]:
    """Records (or, for text, the whole text) of a data file, its path and its format."""
    path = resolve_path(data)
    text = _read_text(path)
    if fmt == "text" or (fmt == "auto" and path.suffix in TEXT_SUFFIXES):
        if not text.strip():
            raise DataError("text file is empty", file=str(path))
        return text, path, "text"
    records = _jsonl_records(text, str(path)) if path.suffix == ".jsonl" else _json_array_records(text, str(path))
    if not records:
        raise DataError("no records in file", file=str(path))
    fmt = detect_format(path, records) if fmt == "auto" else fmt
    for record in records:
        _validate(record, fmt)
    return records, path, fmt


def _require_str(record: Record, name: str, optional: bool = False) -> str:
    if not isinstance(record.fields, dict):
        raise DataError(
            f"each record must be a JSON object, got {type(record.fields).__name__}",
            file=record.file,
            line=record.line,
        )
    value = record.fields.get(name)
    if value is None and optional:
        return ""
    if name not in record.fields:
        raise DataError("missing field", file=record.file, line=record.line, field=name)
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {type(value).__name__}", file=record.file, line=record.line, field=name)
    if not optional and not value.strip():
        raise DataError("empty text", file=record.file, line=record.line, field=name)
    return value


def _validate(record: Record, fmt: str) -> None:
    if fmt == "alpaca":
        for name, optional in (("instruction", False), ("input", True), ("output", False)):
            _require_str(record, name, optional)
        return
    if not isinstance(record.fields, dict) or not isinstance(record.fields.get("messages"), list):
        raise DataError("missing or not a list", file=record.file, line=record.line, field="messages")
    messages = record.fields["messages"]
    for i, m in enumerate(messages):
        where = {"file": record.file, "line": record.line, "field": f"messages[{i}]"}
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError("each message needs string 'role' and 'content'", **where)
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError("empty assistant message", **where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant message to learn from", file=record.file, line=record.line, field="messages")


# ---------------------------------------------------------------- templates and masking


def to_messages(record: Record, fmt: str) -> list[dict[str, str]]:
    if fmt == "chat":
        return record.fields["messages"]
    prompt = record.fields["instruction"]
    if record.fields.get("input"):
        prompt += "\n" + record.fields["input"]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record.fields["output"]}]


def render(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """Full text of a conversation and the character spans of the assistant turns (the loss spans)."""
    if tokenizer.chat_template:
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            spans.append((len(before), len(through)))
        return tokenizer.apply_chat_template(messages, tokenize=False), spans
    # No chat template: the Alpaca prompt template (single turn: first user turn, first assistant turn).
    user = next(m["content"] for m in messages if m["role"] == "user")
    answer = next(m["content"] for m in messages if m["role"] == "assistant")
    instruction, _, context = user.partition("\n")
    prompt = ALPACA_PROMPT.format(
        ctx=", paired with an input that provides further context" if context else "",
        instruction=instruction,
        input_block=f"### Input:\n{context}\n\n" if context else "",
    )
    full = prompt + answer + (tokenizer.eos_token or "")
    return full, [(len(prompt), len(full))]


def encode(text: str, spans: list[tuple[int, int]], tokenizer: Any, train_on_prompt: bool) -> Sample:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_prompt:
        return Sample(ids, list(ids))
    labels = [
        t if any(s <= start < e for s, e in spans) else IGNORE
        for t, (start, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return Sample(ids, labels)


def _text_blocks(text: str, tokenizer: Any, max_length: int) -> list[Sample]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    ids: list[int] = tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"]
    return [Sample(ids[i : i + max_length], ids[i : i + max_length]) for i in range(0, len(ids) - 1, max_length)]


def build_samples(
    data: str,
    tokenizer: Any,
    max_length: int,
    fmt: str = "auto",
    train_on_prompt: bool = False,
    max_samples: int | None = None,
) -> tuple[list[Sample], DataStats]:
    """Tokenized, masked, truncated samples of a data file and counts of what happened to them."""
    records, path, fmt = load_records(data, fmt)
    template = "chat_template" if tokenizer.chat_template else "alpaca"
    if fmt == "text":
        samples = _text_blocks(records, tokenizer, max_length)  # type: ignore[arg-type]
        stats = DataStats(str(path), fmt, "blocks", records=len(samples))
        samples = samples[:max_samples] if max_samples else samples
    else:
        records = records[:max_samples] if max_samples else records  # type: ignore[index]
        stats = DataStats(str(path), fmt, template, records=len(records))
        samples = []
        for record in records:  # type: ignore[union-attr]
            sample = encode(*render(to_messages(record, fmt), tokenizer), tokenizer, train_on_prompt)
            if len(sample) > max_length:
                stats.truncated += 1
                sample = Sample(sample.input_ids[:max_length], sample.labels[:max_length])
            if sum(label != IGNORE for label in sample.labels[1:]) == 0:
                stats.skipped_no_loss += 1
                continue
            samples.append(sample)
    if not samples:
        raise DataError(
            f"no usable samples: {stats.skipped_no_loss} of {stats.records} have no response tokens within "
            f"max_length={max_length}; raise --max-length",
            file=str(path),
        )
    stats.samples = len(samples)
    stats.tokens = sum(len(s) for s in samples)
    stats.loss_tokens = sum(sum(label != IGNORE for label in s.labels[1:]) for s in samples)
    return samples, stats


# ---------------------------------------------------------------- batching and packing


@dataclass
class Batch:
    """Model inputs of one micro-step and the real-token counts the profiler needs."""

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE on prompt, padding and sample starts in packed rows
    attention_mask: torch.Tensor  # (B, T) 0/1 for padded batches; (B, 1, T, T) bool for packed rows
    position_ids: torch.Tensor  # (B, T), restarting at 0 for every sample
    tokens: int  # real (non-padding) tokens
    loss_tokens: int  # tokens that carry loss
    sample_lengths: list[int] = field(default_factory=list)

    def model_inputs(self, device: torch.device, additive_mask: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors for the model's forward. `additive_mask` turns a packed bool mask into the float
        mask (0 / most negative) that eager attention needs; sdpa takes the bool mask as is."""
        mask = self.attention_mask
        if additive_mask is not None and mask.dim() == 4:
            mask = torch.zeros(mask.shape, dtype=additive_mask).masked_fill_(~mask, torch.finfo(additive_mask).min)
        return {
            "input_ids": self.input_ids.to(device, non_blocking=True),
            "attention_mask": mask.to(device, non_blocking=True),
            "position_ids": self.position_ids.to(device, non_blocking=True),
        }


def plan_epoch(
    samples: list[Sample], batch_size: int, packing: bool, max_length: int, group_by_length: bool, seed: int
) -> list[list[list[int]]]:
    """Sample indices of every batch of one epoch: batch -> rows -> samples in the row.

    Without packing every row holds one sample. With `group_by_length`, samples of similar length
    share a batch (sorted within shuffled windows of 64 batches) so little compute goes to padding.
    """
    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    if packing:
        rows = pack_rows([len(samples[i]) for i in order], max_length, sort=group_by_length)
        rows = [[order[j] for j in row] for row in rows]
    else:
        rows = [[i] for i in order]
    if group_by_length:
        window = batch_size * 64
        rows = [
            row
            for w in range(0, len(rows), window)
            for row in sorted(rows[w : w + window], key=lambda r: -sum(len(samples[i]) for i in r))
        ]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def pack_rows(lengths: list[int], capacity: int, sort: bool = True) -> list[list[int]]:
    """First-fit (decreasing when `sort`) bin packing of sample lengths into rows of `capacity` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate(rows: list[list[Sample]], pad_id: int, packed: bool) -> Batch:
    """Right-pad rows to the longest; packed rows get a block-diagonal causal mask (no cross-sample attention)."""
    width = max(sum(len(s) for s in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    # segment id of each position; padding gets a unique negative id so it only attends to itself
    segments = -1 - torch.arange(width).repeat(n, 1)
    lengths = []
    for r, row in enumerate(rows):
        at = 0
        for k, s in enumerate(row):
            end = at + len(s)
            input_ids[r, at:end] = torch.tensor(s.input_ids)
            labels[r, at:end] = torch.tensor(s.labels)
            labels[r, at] = IGNORE  # never predict a sample's first token from the previous sample
            position_ids[r, at:end] = torch.arange(len(s))
            segments[r, at:end] = k
            lengths.append(len(s))
            at = end
        if not packed:
            position_ids[r, at:] = torch.arange(at, width)
    real = segments >= 0
    if packed:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        attention_mask = (segments[:, :, None] == segments[:, None, :]) & causal  # (B, T, T)
        attention_mask = attention_mask[:, None]  # (B, 1, T, T)
    else:
        attention_mask = real.long()
    loss_tokens = int((labels[:, 1:] != IGNORE).sum())
    return Batch(input_ids, labels, attention_mask, position_ids, int(real.sum()), loss_tokens, lengths)


def iterate_batches(samples: list[Sample], plan: list[list[list[int]]], pad_id: int, packed: bool) -> Iterator[Batch]:
    for batch in plan:
        yield collate([[samples[i] for i in row] for row in batch], pad_id, packed)
