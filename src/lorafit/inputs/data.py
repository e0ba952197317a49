"""Training data: read records, render them with a template, mask prompts, and batch or pack them.

Sources (`sources.read_source`): the built-in sets, JSON/JSONL/text files, CSV/Parquet/Arrow files,
`datasets` directories and hub ids. Formats: Alpaca (`instruction`, `input`, `output`), chat
(`messages` with role/content), ShareGPT (`conversations` with from/value), text per sample (a `text`
field, loss on every token) and plain text (a text file, cut into blocks of --max-length tokens).
Bad input raises `DataError` naming the file, line (or row) and field. Nothing is dropped silently:
truncated and skipped samples are counted in `DataStats`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafit.base.errors import DataError
from lorafit.inputs.sources import BUILTIN, DATASET_DIR, TEXT_SUFFIXES, Record, RowError, read_source

__all__ = ["BUILTIN", "DATASET_DIR", "TEXT_SUFFIXES", "DataError", "Record", "RowError"]  # re-exported

IGNORE = -100  # label of tokens that carry no loss (the convention of torch's cross_entropy)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
# ShareGPT speaker names (`from`) and the chat role each one is.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Fields:
    """Which record fields hold what: --text-field, --prompt-field, --response-field, --messages-field.
    None means the format's own name (text; instruction + input; output; messages or conversations)."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: str | None = None

    @classmethod
    def of(cls, cfg: Any) -> Fields:
        """The field mapping of a TrainConfig."""
        return cls(cfg.text_field, cfg.prompt_field, cfg.response_field, cfg.messages_field)

    def conversation(self, fmt: str) -> str:
        return self.messages or ("conversations" if fmt == "sharegpt" else "messages")


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


def detect_format(record: Record, fields: Fields = Fields()) -> str:
    """The format of a source from the fields of its first record. A field flag decides first
    (--messages-field: a conversation; --prompt-field/--response-field: alpaca; --text-field: text);
    then the names: a conversation field (`messages`, `conversations`), instruction/output -> alpaca,
    text -> text. A conversation is chat when its turns have `role`, ShareGPT when they have `from`,
    else by its name (messages -> chat, conversations -> sharegpt)."""
    if not isinstance(record.fields, dict):
        raise _not_an_object(record)
    names = record.fields
    if fields.messages:
        return _conversation_format(names.get(fields.messages), "chat")
    if fields.prompt or fields.response:
        return "alpaca"
    if fields.text:
        return "text"
    for name, fmt in (("messages", "chat"), ("conversations", "sharegpt")):
        if name in names:
            return _conversation_format(names[name], fmt)
    if "instruction" in names or "output" in names:
        return "alpaca"
    if "text" in names:
        return "text"
    raise record.error(
        f"cannot tell the format from the fields {sorted(names)}: expected messages (chat), conversations "
        "(sharegpt), instruction/output (alpaca) or text; set --data-format and the field flags "
        "(--messages-field, --prompt-field, --response-field, --text-field)"
    )


def _conversation_format(turns: Any, default: str) -> str:
    """sharegpt when the first turn has `from`, chat when it has `role`, else `default`."""
    first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
    return "sharegpt" if "from" in first else "chat" if "role" in first else default


def load_records(
    data: str, fmt: str = "auto", *, split: str = "train", fields: Fields = Fields()
) -> tuple[list[Record] | str, str, str]:
    """Records (or, for a plain text file, the whole text) of a data source, its name and its format.
    A text source is "text" in blocks; `fmt` "text" on records means one sample per record's text field."""
    source = read_source(data, split)
    if source.text is not None:
        if fmt not in ("auto", "text"):
            raise DataError(f"a plain text file has no records to read as {fmt}; use a record file", file=source.name)
        return source.text, source.name, "text"
    records = source.records or []
    fmt = detect_format(records[0], fields) if fmt == "auto" else fmt
    for record in records:
        validate(record, fmt, fields)
    return records, source.name, fmt


def _not_an_object(record: Record) -> DataError:
    return record.error(f"each record must be a JSON object, got {type(record.fields).__name__}")


def _require_str(record: Record, name: str, optional: bool = False, allow_empty: bool = False) -> str:
    if not isinstance(record.fields, dict):
        raise _not_an_object(record)
    value = record.fields.get(name)
    if value is None and optional:
        return ""
    if name not in record.fields:
        raise record.error("missing field", name)
    if not isinstance(value, str):
        raise record.error(f"must be a string, got {type(value).__name__}", name)
    if not (optional or allow_empty) and not value.strip():
        raise record.error("empty text", name)
    return value


def validate(record: Record, fmt: str, fields: Fields = Fields()) -> None:
    """Raise a DataError naming the record's file, line (or row) and field when it is not of `fmt`."""
    if fmt == "alpaca":
        if fields.prompt:
            _require_str(record, fields.prompt)
        else:
            _require_str(record, "instruction")
            _require_str(record, "input", optional=True)
        _require_str(record, fields.response or "output")
    elif fmt == "text":
        _require_str(record, fields.text or "text", allow_empty=True)  # empty texts are counted, not fatal
    elif fmt in ("chat", "sharegpt"):
        _validate_conversation(record, fmt, fields.conversation(fmt))
    else:
        raise DataError(f"unknown data format '{fmt}'", field="data_format")


def _validate_conversation(record: Record, fmt: str, name: str) -> None:
    if not isinstance(record.fields, dict):
        raise _not_an_object(record)
    turns = record.fields.get(name)
    if not isinstance(turns, list):
        raise record.error("missing or not a list", name)
    role_key, text_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    roles = []
    for i, turn in enumerate(turns):
        where = f"{name}[{i}]"
        if not (isinstance(turn, dict) and isinstance(turn.get(role_key), str) and isinstance(turn.get(text_key), str)):
            what = "each turn" if fmt == "sharegpt" else "each message"
            raise record.error(f"{what} needs string '{role_key}' and '{text_key}'", where)
        role = turn[role_key]
        if fmt == "sharegpt":
            if role not in SHAREGPT_ROLES:
                raise record.error(f"unknown role '{role}' (expected one of {', '.join(SHAREGPT_ROLES)})", where)
            role = SHAREGPT_ROLES[role]
        if role == "assistant" and not turn[text_key].strip():
            raise record.error(f"empty assistant {'turn' if fmt == 'sharegpt' else 'message'}", where)
        roles.append(role)
    if "assistant" not in roles:
        raise record.error("no assistant message to learn from", name)


# ---------------------------------------------------------------- templates and masking


def to_messages(record: Record, fmt: str, fields: Fields = Fields()) -> list[dict[str, str]]:
    """The conversation of a validated chat, ShareGPT or Alpaca record, as role/content messages."""
    if fmt == "chat":  # role and content only: rows read through `datasets` may carry other keys as None
        return [{"role": m["role"], "content": m["content"]} for m in record.fields[fields.conversation(fmt)]]
    if fmt == "sharegpt":
        turns = record.fields[fields.conversation(fmt)]
        return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
    if fields.prompt:
        prompt = record.fields[fields.prompt]
    else:
        prompt = record.fields["instruction"]
        if record.fields.get("input"):
            prompt += "\n" + record.fields["input"]
    answer = record.fields[fields.response or "output"]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


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


def text_sample(text: str, tokenizer: Any) -> Sample:
    """One text as one sample with loss on every token, ended by EOS (so the model learns where a
    text ends), like a pretraining document."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else []
    if ids and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return Sample(ids, list(ids))


def _record_sample(record: Record, fmt: str, fields: Fields, tokenizer: Any, train_on_prompt: bool) -> Sample:
    if fmt == "text":
        return text_sample(record.fields[fields.text or "text"], tokenizer)
    return encode(*render(to_messages(record, fmt, fields), tokenizer), tokenizer, train_on_prompt)


def build_samples(
    data: str,
    tokenizer: Any,
    max_length: int,
    fmt: str = "auto",
    train_on_prompt: bool = False,
    max_samples: int | None = None,
    *,
    split: str = "train",
    fields: Fields = Fields(),
) -> tuple[list[Sample], DataStats]:
    """Tokenized, masked, truncated samples of a data source and counts of what happened to them."""
    records, name, fmt = load_records(data, fmt, split=split, fields=fields)
    if isinstance(records, str):
        samples = _text_blocks(records, tokenizer, max_length)
        stats = DataStats(name, fmt, "blocks", records=len(samples))
        samples = samples[:max_samples] if max_samples else samples
    else:
        records = records[:max_samples] if max_samples else records
        template = "samples" if fmt == "text" else "chat_template" if tokenizer.chat_template else "alpaca"
        stats = DataStats(name, fmt, template, records=len(records))
        samples = []
        for record in records:
            sample = _record_sample(record, fmt, fields, tokenizer, train_on_prompt)
            if len(sample) > max_length:
                stats.truncated += 1
                sample = Sample(sample.input_ids[:max_length], sample.labels[:max_length])
            if sum(label != IGNORE for label in sample.labels[1:]) == 0:
                stats.skipped_no_loss += 1
                continue
            samples.append(sample)
    if not samples:
        what = "are empty or one token long" if fmt == "text" else "have no response tokens"
        raise DataError(
            f"no usable samples: {stats.skipped_no_loss} of {stats.records} {what} within "
            f"max_length={max_length}; raise --max-length",
            file=name,
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
        """Tensors for the model's forward.

        Padded rows get no attention mask: they are right-padded, so under the causal mask a real token
        attends only to earlier positions, all real, and the padding's own outputs carry no loss. The
        logits of real tokens are the same, and attention runs its causal kernel (SDPA's is_causal)
        instead of reading a (B, 1, T, T) mask. Packed rows keep their block-diagonal mask;
        `additive_mask` turns it into the float mask (0 / most negative) that eager attention needs."""
        inputs = {
            "input_ids": self.input_ids.to(device, non_blocking=True),
            "position_ids": self.position_ids.to(device, non_blocking=True),
        }
        mask = self.attention_mask
        if mask.dim() == 4:
            if additive_mask is not None:
                mask = torch.zeros(mask.shape, dtype=additive_mask).masked_fill_(~mask, torch.finfo(additive_mask).min)
            inputs["attention_mask"] = mask.to(device, non_blocking=True)
        return inputs


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


# Padding share of a micro-batch from which its samples are laid end to end in one row (`collate(flatten=True)`).
# At or above it the row is also at most 0.9 of the padded batch's tokens, which covers the one extra tensor
# per layer the per-sample attention keeps (its joined output, hidden-size wide: under 7% of a layer's
# saved activations, `measurement.estimate.saved_per_token`): the estimate, made for padded rows, stays an
# upper bound. Packed rows are always laid end to end: that extra tensor costs less than attending through
# their mask did (LoRA, batch 2 x 1024 of packed Alpaca: peak 3.61 GB, estimate +2.9%; with the mask 4.03 GB,
# estimate -7.8%; docs/benchmarks/2026-12-03-cpu-estimate-accuracy-packed.json).
FLATTEN_ABOVE = 0.1


def padding_share(rows: list[list[Sample]]) -> float:
    """Fraction of a right-padded batch of these rows that is padding."""
    lengths = [sum(len(s) for s in row) for row in rows]
    return 1 - sum(lengths) / (len(lengths) * max(lengths))


def collate(rows: list[list[Sample]], pad_id: int, packed: bool, flatten: bool = False) -> Batch:
    """Right-pad rows to the longest; packed rows get a block-diagonal causal mask (no cross-sample attention).

    `flatten` (the model attends within each sample by position ids: `adapters.attention`): packed rows, and
    unpacked rows whose padding would be FLATTEN_ABOVE or more of the batch, are laid end to end in one row
    instead, positions restarting at each sample; the same samples, labels and loss tokens, no padding and
    no (T x T) mask."""
    if flatten and (packed or (len(rows) > 1 and padding_share(rows) >= FLATTEN_ABOVE)):
        rows, packed = [[s for row in rows for s in row]], False
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
