"""--data formats: alpaca, chat, ShareGPT and text per sample; auto detection; field mapping flags; errors."""

import json

import pytest

from lorafit.inputs import data
from lorafit.inputs.data import IGNORE, DataError


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def trained_text(tokenizer, sample):
    return tokenizer.decode([t for t, y in zip(sample.input_ids, sample.labels) if y != IGNORE])


def test_jsonl_with_text_field_is_text_per_sample(tiny_tokenizer, tmp_path):
    """Regression: a JSONL of {"text": ...} records was detected as Alpaca and rejected ("missing field")."""
    rows = [{"text": "The cat sat on the mat."}, {"text": "A dog barked twice at night."}]
    samples, stats = data.build_samples(jsonl(tmp_path, rows), tiny_tokenizer, 512)
    assert stats.format == "text" and stats.samples == 2
    for sample, row in zip(samples, rows):
        assert sample.labels == sample.input_ids  # every token carries loss, like pretraining
        assert tiny_tokenizer.decode(sample.input_ids) == row["text"] + tiny_tokenizer.eos_token


def test_text_per_sample_truncates_and_counts(tiny_tokenizer, tmp_path):
    long = " ".join(f"w{i}" for i in range(200))
    rows = [{"text": long}, {"text": "short one"}, {"text": "   "}]
    samples, stats = data.build_samples(jsonl(tmp_path, rows), tiny_tokenizer, 16)
    assert (stats.records, stats.samples, stats.truncated, stats.skipped_no_loss) == (3, 2, 1, 1)
    assert len(samples[0]) == 16 and samples[0].input_ids == tiny_tokenizer(long)["input_ids"][:16]
    assert stats.template == "samples" and stats.loss_tokens == sum(len(s) - 1 for s in samples)


def test_text_format_named_explicitly_with_a_text_field(tiny_tokenizer, tmp_path):
    rows = [{"body": "first body", "id": 1}, {"body": "second body", "id": 2}]
    path = jsonl(tmp_path, rows)
    samples, stats = data.build_samples(path, tiny_tokenizer, 64, fields=data.Fields(text="body"))
    assert stats.format == "text" and [tiny_tokenizer.decode(s.input_ids) for s in samples] == [
        "first body<|im_end|>",
        "second body<|im_end|>",
    ]
    samples2, _ = data.build_samples(path, tiny_tokenizer, 64, fmt="text", fields=data.Fields(text="body"))
    assert [s.input_ids for s in samples2] == [s.input_ids for s in samples]
    with pytest.raises(DataError) as e:
        data.build_samples(path, tiny_tokenizer, 64, fmt="text")  # default field 'text' is absent
    assert (e.value.line, e.value.field, e.value.message) == (1, "text", "missing field")


def test_sharegpt_conversations_map_roles(tiny_tokenizer, tmp_path):
    conv = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
        {"from": "user", "value": "bye"},
        {"from": "assistant", "value": "ciao"},
    ]
    [sample], stats = data.build_samples(jsonl(tmp_path, [{"conversations": conv}]), tiny_tokenizer, 512)
    assert stats.format == "sharegpt"
    assert trained_text(tiny_tokenizer, sample) == "hello<|im_end|>\nciao<|im_end|>\n"
    roles = ["system", "user", "assistant", "user", "assistant"]
    chat = [{"role": r, "content": t["value"]} for r, t in zip(roles, conv)]
    expected = tiny_tokenizer.apply_chat_template(chat, tokenize=False)
    assert tiny_tokenizer.decode(sample.input_ids) == expected


def test_format_is_detected_from_the_first_record(tiny_tokenizer, tmp_path):
    cases = {
        "chat": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        "alpaca": {"instruction": "q", "output": "a"},
        "text": {"text": "some words", "meta": "x"},
    }
    for i, (fmt, row) in enumerate(cases.items()):
        _, stats = data.build_samples(jsonl(tmp_path, [row], f"{i}.jsonl"), tiny_tokenizer, 64)
        assert stats.format == fmt
    with pytest.raises(DataError, match="cannot tell the format") as e:
        data.build_samples(jsonl(tmp_path, [{"question": "q", "answer": "a"}], "x.jsonl"), tiny_tokenizer, 64)
    assert e.value.line == 1 and "answer" in str(e.value)


def test_field_mapping_flags(tiny_tokenizer, tmp_path):
    qa = jsonl(tmp_path, [{"question": "What is 2+2?", "answer": "Four"}], "qa.jsonl")
    [sample], stats = data.build_samples(
        qa, tiny_tokenizer, 256, fields=data.Fields(prompt="question", response="answer")
    )
    assert stats.format == "alpaca" and trained_text(tiny_tokenizer, sample) == "Four<|im_end|>\n"
    assert "What is 2+2?" in tiny_tokenizer.decode(sample.input_ids)

    chat = {"dialog": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "chat answer"}]}
    share = {"turns": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "share answer"}]}
    for name, row, fmt in (("dialog", chat, "chat"), ("turns", share, "sharegpt")):
        [sample], stats = data.build_samples(
            jsonl(tmp_path, [row], f"{name}.jsonl"), tiny_tokenizer, 256, fields=data.Fields(messages=name)
        )
        assert stats.format == fmt
        assert trained_text(tiny_tokenizer, sample) == f"{fmt.replace('sharegpt', 'share')} answer<|im_end|>\n"

    with pytest.raises(DataError) as e:
        data.build_samples(qa, tiny_tokenizer, 256, fields=data.Fields(prompt="question", response="reply"))
    assert (e.value.file, e.value.line, e.value.field, e.value.message) == (qa, 1, "reply", "missing field")


def test_fields_of_a_train_config():
    from lorafit.base.config import TrainConfig

    cfg = TrainConfig(text_field="t", prompt_field="p", response_field="r", messages_field="m")
    assert data.Fields.of(cfg) == data.Fields(text="t", prompt="p", response="r", messages="m")


@pytest.mark.parametrize(
    ("rows", "fmt", "line", "field", "message"),
    [
        (
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}],
            "auto",
            1,
            "conversations[1]",
            "unknown role 'bot'",
        ),
        (
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, {"conversations": 3}],
            "auto",
            2,
            "conversations",
            "missing or not a list",
        ),
        ([{"conversations": [{"from": "human", "text": "q"}]}], "sharegpt", 1, "conversations[0]", "'value'"),
        ([{"conversations": [{"from": "human", "value": "q"}]}], "auto", 1, "conversations", "no assistant"),
        ([{"conversations": [{"from": "gpt", "value": " "}]}], "auto", 1, "conversations[0]", "empty assistant"),
        ([{"text": "ok"}, {"text": 7}], "auto", 2, "text", "must be a string"),
        ([{"messages": [{"role": "user"}]}], "chat", 1, "messages[0]", "'role' and 'content'"),
        ([{"text": "ok"}], "alpaca", 1, "instruction", "missing field"),
    ],
)
def test_format_errors_name_file_line_field(tiny_tokenizer, tmp_path, rows, fmt, line, field, message):
    path = jsonl(tmp_path, rows)
    with pytest.raises(DataError) as e:
        data.build_samples(path, tiny_tokenizer, 256, fmt=fmt)
    assert (e.value.file, e.value.line, e.value.field) == (path, line, field)
    assert message in str(e.value)


def test_sharegpt_errors_in_parquet_name_the_row_and_value(tiny_tokenizer, tmp_path):
    import datasets

    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "model", "value": "a"}]}
    path = tmp_path / "share.parquet"
    datasets.Dataset.from_list([good, good, bad]).to_parquet(str(path))
    with pytest.raises(DataError) as e:
        data.build_samples(str(path), tiny_tokenizer, 256)
    assert (e.value.file, e.value.row, e.value.field) == (str(path), 2, "conversations[1]")
    assert "row 2" in str(e.value) and "unknown role 'model'" in str(e.value)


def test_plain_text_file_cannot_be_read_as_records(tiny_tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("just some text\n")
    with pytest.raises(DataError, match="no records to read as alpaca") as e:
        data.build_samples(str(path), tiny_tokenizer, 64, fmt="alpaca")
    assert e.value.file == str(path)


def test_a_field_flag_decides_the_format_before_the_names(tiny_tokenizer, tmp_path):
    row = {"instruction": "ignored here", "output": "ignored too", "body": "the text to learn"}
    [sample], stats = data.build_samples(jsonl(tmp_path, [row]), tiny_tokenizer, 64, fields=data.Fields(text="body"))
    assert stats.format == "text" and tiny_tokenizer.decode(sample.input_ids) == "the text to learn<|im_end|>"
    with pytest.raises(DataError) as e:  # a named conversation field that is absent is named in the error
        data.build_samples(jsonl(tmp_path, [row], "m.jsonl"), tiny_tokenizer, 64, fields=data.Fields(messages="dialog"))
    assert (e.value.line, e.value.field, e.value.message) == (1, "dialog", "missing or not a list")
