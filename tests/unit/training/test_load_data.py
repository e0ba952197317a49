"""The training run reads its data with the config's split and field mapping (--data-split, --*-field)."""

from __future__ import annotations

import json

import datasets

from lorafit.training.setup import load_data


def test_the_field_mapping_reaches_the_training_data(tiny_cfg, tmp_path):
    rows = [{"question": f"what is {i}?", "answer": f"it is {i}.", "output": ""} for i in range(3)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cfg = tiny_cfg(data=str(path), data_format="alpaca", prompt_field="question", response_field="answer")
    loaded = load_data(cfg)
    assert loaded.stats.samples == 3 and loaded.stats.loss_tokens > 0  # 'output' is empty: the answer carries loss
    text = loaded.tokenizer.decode(loaded.samples[1].input_ids)
    assert "what is 1?" in text and "it is 1." in text


def test_the_split_reaches_the_training_data(tiny_cfg, tmp_path):
    splits = {name: datasets.Dataset.from_dict({"text": [f"{name} row {i}" for i in range(n)]})
              for name, n in (("train", 2), ("valid", 5))}  # fmt: skip
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "ds"))
    loaded = load_data(tiny_cfg(data=str(tmp_path / "ds"), data_split="valid"))
    assert loaded.stats.samples == 5 and "valid row 0" in loaded.tokenizer.decode(loaded.samples[0].input_ids)
