import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.inputs import data
from lorafit.inputs.data import IGNORE, DataError, Sample


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return str(p)


def test_loss_only_on_response_tokens(tiny_tokenizer):
    samples, stats = data.build_samples("alpaca", tiny_tokenizer, 1024, max_samples=4)
    rows = json.loads(data.BUILTIN["alpaca"].read_text())[:4]
    for sample, row in zip(samples, rows):
        trained = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE]
        assert tiny_tokenizer.decode(trained) == row["output"] + "<|im_end|>\n"
        assert sample.labels[0] == IGNORE
    assert stats.template == "chat_template" and stats.samples == 4


def test_train_on_prompt_keeps_every_token(tiny_tokenizer):
    samples, _ = data.build_samples("alpaca", tiny_tokenizer, 1024, train_on_prompt=True, max_samples=2)
    assert all(s.labels == s.input_ids for s in samples)


def test_alpaca_template_without_chat_template(tiny_tokenizer, tmp_path):
    tok = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = None
    path = write(tmp_path, "a.jsonl", json.dumps({"instruction": "Add", "input": "2+2", "output": "4"}) + "\n")
    [sample], stats = data.build_samples(path, tok, 512)
    text = tok.decode(sample.input_ids)
    assert "### Instruction:\nAdd" in text and "### Input:\n2+2" in text and stats.template == "alpaca"
    assert tok.decode([t for t, y in zip(sample.input_ids, sample.labels) if y != IGNORE]) == "4" + tok.eos_token


def test_chat_jsonl_masks_all_but_assistant_turns(tiny_tokenizer, tmp_path):
    conv = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"},
        ]
    }
    [sample], stats = data.build_samples(write(tmp_path, "c.jsonl", json.dumps(conv)), tiny_tokenizer, 512)
    trained = tiny_tokenizer.decode([t for t, y in zip(sample.input_ids, sample.labels) if y != IGNORE])
    assert trained == "hello<|im_end|>\nciao<|im_end|>\n" and stats.format == "chat"


def test_text_file_is_cut_into_blocks(tiny_tokenizer):
    samples, stats = data.build_samples("wikitext2", tiny_tokenizer, 128, max_samples=5)
    assert stats.format == "text" and len(samples) == 5
    assert all(len(s) == 128 and s.labels == s.input_ids for s in samples)


def test_truncation_is_counted(tiny_tokenizer):
    samples, stats = data.build_samples("alpaca", tiny_tokenizer, 64, max_samples=20)
    assert stats.truncated > 0 and all(len(s) <= 64 for s in samples)
    assert stats.samples + stats.skipped_no_loss == 20


@pytest.mark.parametrize(
    ("name", "content", "line", "field", "message"),
    [
        (
            "bad.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", oops}\n',
            2,
            None,
            "invalid JSON",
        ),
        (
            "bad.json",
            '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a"}\n]',
            3,
            "output",
            "missing",
        ),
        ("bad.jsonl", '{"instruction": "a", "output": "  "}\n', 1, "output", "empty"),
        ("bad.jsonl", '{"instruction": 3, "output": "b"}\n', 1, "instruction", "must be a string"),
        ("bad.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', 1, "messages", "no assistant"),
        ("bad.jsonl", "[1, 2]\n", 1, None, "JSON object"),
        ("bad.txt", b"fine\n\xff\xfe broken\n", 2, None, "UTF-8"),
        ("bad.txt", "   \n", None, None, "empty"),
        ("bad.json", "", 1, None, "invalid JSON"),
    ],
)
def test_bad_input_names_file_line_field(tiny_tokenizer, tmp_path, name, content, line, field, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        data.build_samples(path, tiny_tokenizer, 256)
    assert e.value.file == path and e.value.line == line and e.value.field == field
    assert message in str(e.value)


def test_missing_file_and_unusable_samples(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="data not found"):
        data.build_samples(str(tmp_path / "nope.json"), tiny_tokenizer, 256)
    with pytest.raises(DataError, match="no usable samples"):
        data.build_samples("alpaca", tiny_tokenizer, 8, max_samples=3)


def test_packed_rows_restart_positions_and_block_attention():
    a, b = Sample([5, 6, 7], [5, 6, 7]), Sample([8, 9], [8, 9])
    batch = data.collate([[a, b]], pad_id=0, packed=True)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.labels.tolist() == [[IGNORE, 6, 7, IGNORE, 9]]  # never predict b's first token from a
    mask = batch.attention_mask[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask, expected.bool())
    assert (batch.tokens, batch.loss_tokens, batch.sample_lengths) == (5, 3, [3, 2])


@pytest.mark.parametrize("packing", [False, True])
def test_an_epoch_of_batches_trains_every_token_once(tiny_tokenizer, packing):
    """With --train-on-prompt every token but a sample's first is a next-token target, so what an
    epoch's batches count is known without the code's own expressions; packing must neither drop nor
    repeat a sample, nor let a sample's first token be predicted from its neighbour."""
    samples, stats = data.build_samples("alpaca", tiny_tokenizer, 128, train_on_prompt=True, max_samples=20)
    plan = data.plan_epoch(samples, 3, packing, 128, group_by_length=True, seed=1)
    assert sorted(i for batch in plan for row in batch for i in row) == list(range(len(samples)))
    batches = list(data.iterate_batches(samples, plan, tiny_tokenizer.pad_token_id, packing))
    tokens, targets = sum(len(s.input_ids) for s in samples), sum(len(s.input_ids) - 1 for s in samples)
    assert sum(b.tokens for b in batches) == stats.tokens == tokens
    assert sum(b.loss_tokens for b in batches) == stats.loss_tokens == targets
    assert all(b.input_ids.shape[1] <= 128 for b in batches)
    if packing:
        assert len(batches) < len(samples) / 3  # rows hold several samples


def test_pack_rows_respects_capacity():
    lengths = [700, 300, 500, 200, 100, 900]
    rows = data.pack_rows(lengths, 1000)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 1000 for r in rows) and len(rows) == 3


def test_group_by_length_reduces_padding():
    samples = [Sample([1] * n, [1] * n) for n in [10, 200, 15, 190, 20, 210, 12, 205] * 4]

    def padding(plan):
        return sum(len(b) * max(len(samples[r[0]]) for r in b) - sum(len(samples[r[0]]) for r in b) for b in plan)

    grouped = data.plan_epoch(samples, 4, False, 256, True, seed=0)
    shuffled = data.plan_epoch(samples, 4, False, 256, False, seed=0)
    assert sorted(r[0] for b in grouped for r in b) == list(range(len(samples)))
    assert padding(grouped) < padding(shuffled) / 4


records = st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "messages", "extra"]),
    st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=2)),
    max_size=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(records, min_size=1, max_size=4))
def test_random_records_load_or_raise_data_error(tiny_tokenizer, tmp_path, rows):
    path = write(tmp_path, "h.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    try:
        samples, stats = data.build_samples(path, tiny_tokenizer, 64)
    except DataError as e:
        assert e.file == path
    else:
        assert stats.samples == len(samples) > 0
