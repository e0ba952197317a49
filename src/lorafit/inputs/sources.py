"""Where training data comes from: the built-in sets, local files, `datasets` directories and hub ids.

`read_source` turns a `--data` value into a `Source`: either one plain text (WikiText-2 style, cut into
blocks later) or a list of `Record`s, each remembering where it came from so that an error can name it:

- built in: `alpaca`, `wikitext2` (the valid split), `wikitext2-train` (shipped when a copy was
  available at packaging time, otherwise from the hub where the network allows);
- .txt/.text/.raw/.md files: plain text; .json (a list of objects) and .jsonl files: lorafit's own
  parser, whose errors name the file and line. Any of these may be gzip (.gz) or xz (.xz) compressed;
- .csv, .parquet and .arrow files, read through the `datasets` library: errors name the file and row;
- a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (`--data-split` picks a
  split of a DatasetDict);
- a hub id (`owner/name`, optionally `owner/name:config`), loaded with `datasets.load_dataset` where the
  network allows. Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or the hub unreachable) it only
  reads the local `datasets` cache, so it fails at once with one clear error instead of retrying.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lorafit.base.errors import DataError
from lorafit.base.quiet import verbose

DATASET_DIR = Path(__file__).parent / "datasets"
WIKITEXT2_DIR = DATASET_DIR / "wikitext-2"
BUILTIN = {
    "alpaca": DATASET_DIR / "alpaca_en_demo.json",
    "wikitext2": WIKITEXT2_DIR / "valid.txt",
}
# WikiText-2's train split: read from the package when a copy ships (compressed or not), else from the
# hub: the same tokenized version (wikitext-2-v1, with <unk>) as the shipped valid.txt and test.txt.
WIKITEXT2_TRAIN_FILES = tuple(WIKITEXT2_DIR / f"train.txt{z}" for z in (".xz", ".gz", ""))
BUILTIN_HUB = {"wikitext2-train": ("Salesforce/wikitext", "wikitext-2-v1", "train")}
BUILTIN_NAMES = (*BUILTIN, *BUILTIN_HUB)

TEXT_SUFFIXES = (".txt", ".text", ".raw", ".md")
JSON_SUFFIXES = (".json", ".jsonl")
DATASETS_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}  # suffix -> datasets builder
COMPRESSED = {".gz": gzip.decompress, ".xz": lzma.decompress}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
HUB_TIMEOUT_S = 3.0  # how long to wait for the hub's TCP handshake before calling the network absent
_TRUE = {"1", "ON", "YES", "TRUE"}


class RowError(DataError):
    """A bad record of a source read through `datasets`: it names the row (0-based index), not a line."""

    def __init__(self, message: str, *, file: str, row: int, field: str | None = None) -> None:
        self.row = row  # before super().__init__, which formats the message with __str__
        super().__init__(message, file=file, field=field)

    def __str__(self) -> str:
        where = f"{self.file}, row {self.row}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.message}"


@dataclass
class Record:
    """One raw training example and where it came from: a line of a JSON/JSONL file, or a row of a
    source read through `datasets`."""

    fields: dict[str, Any]
    file: str
    line: int | None = None
    row: int | None = None

    def error(self, message: str, field: str | None = None) -> DataError:
        """The error to raise for this record, naming its file and line (or row) and the field."""
        if self.line is None and self.row is not None:
            return RowError(message, file=self.file, row=self.row, field=field)
        return DataError(message, file=self.file, line=self.line, field=field)


@dataclass
class Source:
    """What a `--data` value holds: one plain text (`text`), or records."""

    name: str  # the file, directory or hub id, as errors and DataStats name it
    text: str | None = None
    records: list[Record] | None = None


def read_source(data: str, split: str = "train") -> Source:
    """The text or records `data` names (see the module docstring for what it may be)."""
    if data in BUILTIN:
        return read_file(BUILTIN[data])
    if data in BUILTIN_HUB:
        return _wikitext2_train(data)
    path = Path(data).expanduser()
    if path.is_dir():
        return _read_datasets_dir(path, split)
    if path.exists():
        return read_file(path)
    if HUB_ID.match(data) and plain_suffix(path) not in (*TEXT_SUFFIXES, *JSON_SUFFIXES, *DATASETS_SUFFIXES):
        return read_hub(data, split)
    raise DataError(
        f"data not found; use {', '.join(BUILTIN_NAMES)}, a .json/.jsonl/.txt/.csv/.parquet/.arrow file, "
        "a `datasets` directory or a hub id (owner/name)",
        file=data,
    )


def plain_suffix(path: Path) -> str:
    """The suffix that says the format, under a .gz/.xz compression suffix."""
    return Path(path.stem).suffix if path.suffix in COMPRESSED else path.suffix


def read_file(path: Path) -> Source:
    """A local data file, by its suffix."""
    suffix = plain_suffix(path)
    if suffix in DATASETS_SUFFIXES:
        return _read_with_datasets(path, DATASETS_SUFFIXES[suffix])
    if suffix in TEXT_SUFFIXES:
        text = read_text(path)
        if not text.strip():
            raise DataError("text file is empty", file=str(path))
        return Source(str(path), text=text)
    text = read_text(path)
    records = jsonl_records(text, str(path)) if suffix == ".jsonl" else json_array_records(text, str(path))
    if not records:
        raise DataError("no records in file", file=str(path))
    return Source(str(path), records=records)


def read_text(path: Path) -> str:
    """A file's text, decompressed (.gz, .xz) and decoded as UTF-8; bad bytes are named by line."""
    try:
        raw = path.read_bytes()
        if path.suffix in COMPRESSED:
            raw = COMPRESSED[path.suffix](raw)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"cannot read file: {getattr(e, 'strerror', None) or e}", file=str(path)) from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {e.start})", file=str(path), line=line) from e


def json_array_records(text: str, file: str) -> list[Record]:
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


def jsonl_records(text: str, file: str) -> list[Record]:
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(Record(json.loads(line), file, n))
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", file=file, line=n) from e
    return records


# ---------------------------------------------------------------- through the `datasets` library


def _datasets() -> Any:
    """The `datasets` module, imported on first use (it is slow to import) with its progress bars off."""
    import datasets

    if not verbose():
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    return datasets


def _rows(dataset: Any, name: str) -> Source:
    """Records of a `datasets.Dataset`, one per row, each naming its row index."""
    records = [Record(dict(row), name, row=i) for i, row in enumerate(dataset)]
    if not records:
        raise DataError("no records (the dataset has no rows)", file=name)
    return Source(name, records=records)


def _read_with_datasets(path: Path, builder: str) -> Source:
    """A CSV, Parquet or Arrow file through the `datasets` builder of that name."""
    ds = _datasets()
    try:
        with offline_mode():  # a local file needs no network: make sure nothing tries it
            dataset = ds.load_dataset(builder, data_files=str(path), split="train")
    except (ds.builder.DatasetGenerationError, ValueError, OSError) as e:
        cause = e.__cause__ or e
        raise DataError(f"cannot read as {builder}: {type(cause).__name__}: {cause}", file=str(path)) from e
    return _rows(dataset, str(path))


def _read_datasets_dir(path: Path, split: str) -> Source:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    ds = _datasets()
    try:
        dataset = ds.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(
            "a directory must be one written by `datasets` (Dataset/DatasetDict.save_to_disk); "
            "otherwise give a data file",
            file=str(path),
        ) from e
    return _rows(_pick_split(dataset, split, str(path)), str(path))


def _pick_split(dataset: Any, split: str, name: str) -> Any:
    """The `split` of a DatasetDict (a Dataset is its own single split)."""
    if not hasattr(dataset, "keys"):
        return dataset
    if split not in dataset:
        present = ", ".join(dataset)
        raise DataError(f"no split '{split}'; splits present: {present} (choose with --data-split)", file=name)
    return dataset[split]


def _offline_env() -> bool:
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the hub endpoint (HF_ENDPOINT) answers a TCP handshake within `timeout` seconds.
    Without this, `datasets` retries an unreachable hub for about 30 seconds before it gives up."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def offline_mode() -> Iterator[None]:
    """`datasets` and `huggingface_hub` read HF_HUB_OFFLINE once, when imported; set their flags for
    this call so that a load reads the local cache only and never waits on the network."""
    import huggingface_hub.constants as hub_constants

    config = _datasets().config
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # which exist depends on the versions
    flags = [(m, n) for m in (config, hub_constants) for n in names if hasattr(m, n)]
    saved = [getattr(m, n) for m, n in flags]
    for m, n in flags:
        setattr(m, n, True)
    try:
        yield
    finally:
        for (m, n), value in zip(flags, saved, strict=True):
            setattr(m, n, value)


class HubUnreachable(DataError):
    """A hub id that could not be loaded: offline or no network, and no cached copy."""

    def __init__(self, message: str, *, file: str, why: str) -> None:
        self.why = why
        super().__init__(message, file=file)


def load_hub(repo: str, config: str | None, split: str, name: str) -> Any:
    """`datasets.load_dataset(repo, config, split=split)`, offline (cache only) when the environment
    says so or the hub does not answer."""
    ds = _datasets()
    offline = _offline_env() or not hub_reachable()
    try:
        with offline_mode() if offline else nullcontext():
            return ds.load_dataset(repo, config, split=split)
    except (ConnectionError, FileNotFoundError) as e:
        if not offline:
            raise DataError(f"not found on the Hugging Face hub: {e}", file=name) from e
        why = "offline mode is set (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if _offline_env() else "no network"
        raise HubUnreachable(
            f"could not reach the Hugging Face hub: {why}, and there is no cached copy of '{repo}'; --data "
            f"expected a local path (a data file or a `datasets` directory) or one of {', '.join(BUILTIN_NAMES)}",
            file=name,
            why=why,
        ) from e
    except ValueError as e:  # an unknown split or config
        raise DataError(f"{e} (choose the split with --data-split, a config as owner/name:config)", file=name) from e


def read_hub(spec: str, split: str) -> Source:
    """A hub dataset `owner/name` or `owner/name:config`, split `split`."""
    repo, _, config = spec.partition(":")
    return _rows(load_hub(repo, config or None, split, spec), spec)


def _wikitext2_train(name: str) -> Source:
    """WikiText-2's train split: the shipped copy, else the hub's rows (one line each) joined back into text."""
    for path in WIKITEXT2_TRAIN_FILES:
        if path.is_file():
            return read_file(path)
    repo, config, split = BUILTIN_HUB[name]
    try:
        dataset = load_hub(repo, config, split, name)
    except HubUnreachable as e:
        raise DataError(
            f"WikiText-2's train split is not shipped with this lorafit and the hub, where it would load from "
            f"({repo}, {config}), could not be reached: {e.why}. Pass a local copy as a file, or train on "
            "'wikitext2' (the valid split)",
            file=name,
        ) from e
    return Source(f"{repo}:{config}[{split}]", text="".join(dataset["text"]))
