"""What the memory plan reads of the data: the typical row (micro-step costs) and the longest (peaks)."""

from __future__ import annotations

from lorafit.base.config import TrainConfig
from lorafit.inputs.data import DataStats, Sample
from lorafit.training.setup import Loaded


def loaded(*lengths: int) -> Loaded:
    samples = [Sample(list(range(n)), list(range(n))) for n in lengths]
    return Loaded(tokenizer=None, samples=samples, stats=DataStats("test", "text", "none"))


def test_unpacked_rows_are_the_samples():
    rows = loaded(100, 300, 200).plan_rows(TrainConfig(max_length=1024))
    assert rows == {"row_tokens": 200.0, "longest_row": 300}


def test_packed_rows_are_max_length():
    rows = loaded(100, 300).plan_rows(TrainConfig(max_length=512, packing=True))
    assert rows == {"row_tokens": 512.0, "longest_row": 512}
