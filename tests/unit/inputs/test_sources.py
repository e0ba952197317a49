"""--data sources: `datasets` directories, Parquet/Arrow/CSV/JSON(L) files, hub ids (offline here), the
built-in WikiText-2 train split; errors name the file and the line or row."""

import gzip
import json
import lzma
import time

import datasets
import pyarrow as pa
import pytest

from lorafit.inputs import data, sources
from lorafit.inputs.data import IGNORE, DataError
from lorafit.inputs.sources import RowError

ALPACA = [
    {"instruction": "Add the numbers", "input": "2 and 3", "output": "Five"},
    {"instruction": "Name a colour", "input": "", "output": "Blue"},
    {"instruction": "Say hi", "input": "", "output": "Hello there"},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing in these tests may reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def responses(tokenizer, samples):
    return [tokenizer.decode([t for t, y in zip(s.input_ids, s.labels) if y != IGNORE]) for s in samples]


def expected_alpaca(tokenizer, rows=ALPACA):
    """What the built samples of `rows` must train on: each output and the chat template's end of turn."""
    return [r["output"] + "<|im_end|>\n" for r in rows]


def write_arrow(table, path, stream):
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        writer.write_table(table)
        writer.close()


@pytest.mark.parametrize("kind", ["parquet", "csv", "arrow-stream", "arrow-file", "json", "jsonl", "jsonl.gz"])
def test_every_file_kind_gives_the_same_samples(tiny_tokenizer, tmp_path, kind):
    ds = datasets.Dataset.from_list(ALPACA)
    path = tmp_path / f"d.{kind.split('-')[0]}"
    if kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind.startswith("arrow"):
        write_arrow(ds.data.table, path, stream=kind == "arrow-stream")
    elif kind == "json":
        path.write_text(json.dumps(ALPACA, indent=1))
    else:
        text = "".join(json.dumps(r) + "\n" for r in ALPACA)
        path.write_bytes(gzip.compress(text.encode()) if kind.endswith(".gz") else text.encode())
    samples, stats = data.build_samples(str(path), tiny_tokenizer, 512)
    assert (stats.file, stats.format, stats.records, stats.samples) == (str(path), "alpaca", 3, 3)
    assert responses(tiny_tokenizer, samples) == expected_alpaca(tiny_tokenizer)


def test_datasets_directory_of_one_dataset(tiny_tokenizer, tmp_path):
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "ds"))
    samples, stats = data.build_samples(str(tmp_path / "ds"), tiny_tokenizer, 512)
    assert stats.format == "alpaca" and responses(tiny_tokenizer, samples) == expected_alpaca(tiny_tokenizer)


def test_datasets_dict_directory_picks_the_split(tiny_tokenizer, tmp_path):
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ALPACA[:2]), test=datasets.Dataset.from_list(ALPACA[2:]))
    dd.save_to_disk(str(tmp_path / "dd"))
    train, _ = data.build_samples(str(tmp_path / "dd"), tiny_tokenizer, 512)
    test, _ = data.build_samples(str(tmp_path / "dd"), tiny_tokenizer, 512, split="test")
    assert responses(tiny_tokenizer, train) == expected_alpaca(tiny_tokenizer, ALPACA[:2])
    assert responses(tiny_tokenizer, test) == expected_alpaca(tiny_tokenizer, ALPACA[2:])
    with pytest.raises(DataError) as e:
        data.build_samples(str(tmp_path / "dd"), tiny_tokenizer, 512, split="validation")
    assert e.value.file == str(tmp_path / "dd")
    assert "no split 'validation'" in str(e.value) and "splits present: train, test" in str(e.value)


def test_a_directory_not_written_by_datasets(tiny_tokenizer, tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="save_to_disk") as e:
        data.build_samples(str(tmp_path / "plain"), tiny_tokenizer, 512)
    assert e.value.file == str(tmp_path / "plain")


def test_rows_read_through_datasets_name_file_row_and_field(tiny_tokenizer, tmp_path):
    rows = [*ALPACA, {"instruction": "Empty answer", "input": "", "output": "   "}]
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(RowError) as e:
        data.build_samples(str(path), tiny_tokenizer, 512)
    assert (e.value.file, e.value.row, e.value.field, e.value.line) == (str(path), 3, "output", None)
    assert str(e.value) == f"{path}, row 3, field 'output': empty text"


def test_a_file_datasets_cannot_parse(tiny_tokenizer, tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="cannot read as parquet") as e:
        data.build_samples(str(path), tiny_tokenizer, 512)
    assert e.value.file == str(path)


def test_hub_id_offline_fails_at_once_with_one_clear_error(tiny_tokenizer):
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        data.build_samples("nobody-here/no-such-dataset", tiny_tokenizer, 512)
    assert time.monotonic() - start < 20  # without offline handling datasets retries for ~30 s
    assert e.value.file == "nobody-here/no-such-dataset"
    assert "could not reach the Hugging Face hub: offline mode is set" in str(e.value) and "local path" in str(e.value)


def test_hub_id_without_network_never_waits_on_it(tiny_tokenizer, monkeypatch):
    """No offline variable set and the hub unreachable: the load runs in offline mode (cache only)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=0: False)
    seen = []

    def load_dataset(*args, **kw):
        seen.append((datasets.config.HF_HUB_OFFLINE, args, kw))
        raise ConnectionError("Couldn't reach it on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(DataError, match="could not reach the Hugging Face hub: no network"):
        data.build_samples("owner/name", tiny_tokenizer, 512)
    assert seen == [(True, ("owner/name", None), {"split": "train"})]
    assert before == datasets.config.HF_HUB_OFFLINE  # restored after the call


def test_hub_id_with_config_and_split(tiny_tokenizer, monkeypatch):
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return datasets.Dataset.from_list(ALPACA)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    samples, stats = data.build_samples("owner/name:small", tiny_tokenizer, 512, split="test")
    assert calls == [("owner/name", "small", "test")] and stats.file == "owner/name:small"
    assert responses(tiny_tokenizer, samples) == expected_alpaca(tiny_tokenizer)


def test_missing_file_is_not_taken_for_a_hub_id(tiny_tokenizer, tmp_path):
    for spec in ("data/train.jsonl", str(tmp_path / "nope.parquet"), "nothing"):
        with pytest.raises(DataError, match="data not found") as e:
            data.build_samples(spec, tiny_tokenizer, 512)
        assert e.value.file == spec


def test_wikitext2_train_ships_compressed_or_comes_from_the_hub(tiny_tokenizer, tmp_path, monkeypatch):
    text = "\n = Article =\n\n" + " ".join(f"word{i}" for i in range(400)) + "\n"
    shipped = tmp_path / "train.txt.xz"
    shipped.write_bytes(lzma.compress(text.encode()))
    monkeypatch.setattr(sources, "WIKITEXT2_TRAIN_FILES", (shipped,))
    samples, stats = data.build_samples("wikitext2-train", tiny_tokenizer, 64)
    ids = tiny_tokenizer(" = Article =\n" + " ".join(f"word{i}" for i in range(400)), add_special_tokens=False)
    assert stats.format == "text" and stats.template == "blocks" and stats.file == str(shipped)
    assert [t for s in samples for t in s.input_ids] == ids["input_ids"]

    monkeypatch.setattr(sources, "WIKITEXT2_TRAIN_FILES", (tmp_path / "absent.txt.xz",))
    with pytest.raises(DataError) as e:  # offline and not shipped
        data.build_samples("wikitext2-train", tiny_tokenizer, 64)
    assert e.value.file == "wikitext2-train" and "not shipped" in str(e.value) and "offline" in str(e.value)

    lines = [" = Article =\n", " Alpha beta gamma .\n", "\n"]  # the hub's rows: one line each
    asked = []

    def load_hub(*args):
        asked.append(args)
        return datasets.Dataset.from_dict({"text": lines})

    monkeypatch.setattr(sources, "load_hub", load_hub)
    samples, stats = data.build_samples("wikitext2-train", tiny_tokenizer, 64)
    assert asked == [("Salesforce/wikitext", "wikitext-2-v1", "train", "wikitext2-train")]
    decoded = tiny_tokenizer.decode([t for s in samples for t in s.input_ids])
    assert decoded == " = Article =\n Alpha beta gamma ." and stats.file == "Salesforce/wikitext:wikitext-2-v1[train]"


def test_wikitext2_train_name_is_known_to_the_error(tiny_tokenizer):
    with pytest.raises(DataError, match="wikitext2-train"):
        data.build_samples("no-such-builtin", tiny_tokenizer, 64)
