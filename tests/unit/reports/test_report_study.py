"""The comparison report mirrors the QLoRA report: Table 12's columns from the stored numbers, the
improvement against a chosen baseline, each run's own settings, and Figure 1's six panels with the
trainable parameters on a log axis. A figure the record lacks is "—", never estimated.

The runs are the study's TinyLlama-1.1B pair (full fine-tuning and QLoRA r=16 on all seven projections,
Tables 3, 6-12) stored as lorafit stores runs; `random:tinyllama-1.1b` has TinyLlama's shapes."""

from __future__ import annotations

import math

import pytest

from lorafit.base.errors import UserError
from lorafit.reports import charts, compare
from lorafit.reports.compare import build_rows, deployed_bytes, render_html, render_markdown
from lorafit.run.evaluation import EvalQuantization, Evaluation
from lorafit.run.store import RunRecord
from lorafit.run.summary import Summary
from tests.helpers import TableReader

MIB, GIB = 2**20, 2**30
MODEL = "random:tinyllama-1.1b"
# TinyLlama-1.1B (inputs/archs/tinyllama-1.1b.json): hidden 2048, intermediate 5632, 22 layers, kv 4 x 64, vocab 32000
PER_LAYER = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632  # q, o; k, v; gate, up, down
QUANTIZED = 22 * PER_LAYER  # what bitsandbytes stores in 4 bits
BASE = 1_100_048_384  # the study's total (Table 2)
UNQUANTIZED = 2 * 32000 * 2048 + (2 * 22 + 1) * 2048  # embeddings, lm_head, norms
ADAPTER = 22 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 256) + 3 * (2048 + 5632))  # r=16 on all seven: Table 6


def summary(method: str, **figures) -> Summary:
    return Summary.from_dict({"schema_version": 3, "status": "ok", "method": method, "model": MODEL, **figures})


def evaluation(ppl: float, total_s: float, tokens_per_s: float, **extra) -> dict:
    return {
        "model": MODEL,
        "method": extra.pop("method", "base"),
        "size": {"total_params": extra.pop("total_params", BASE), "disk_bytes": extra.pop("disk_bytes", 3 * 10**8)},
        "perplexity": {"ppl": ppl},
        "generation": {"batch": 1, "new_tokens": 50, "total_s": total_s, "tokens_per_s": tokens_per_s},
        **extra,
    }


NF4 = {"quant_type": "nf4", "double_quant": True}


@pytest.fixture(autouse=True)
def no_charts(request, monkeypatch):
    """The table tests render the page without drawing the charts (seconds each on a busy machine);
    the tests of the charts draw them."""
    if "chart" not in request.node.name:
        monkeypatch.setattr(compare, "charts", lambda rows: {})


def study_records() -> list[RunRecord]:
    """The dense and 4-bit bases, then the study's Standard FT and QLoRA (Tables 3, 7-11)."""
    full = summary(
        "full",
        total_params=BASE,
        trainable_params=BASE,
        trainable_pct=100.0,
        flops_per_step=13.52e12,
        achieved_flops_per_s=4.69e12,
        mfu=0.1318,
        step_time_s={"mean": 2.88, "p50": 2.8},
        micro_step_time_s={"mean": 0.72, "p50": 0.7},  # grad_accum 4: a micro-step is not a step
        train_s=1441.24,
        tokens_per_s=2844.4,
        peak_memory={"kind": "cuda", "peak_bytes": 12 * GIB},
        j_per_token=0.0123,
    )
    qlora = summary(
        "qlora",
        total_params=BASE + ADAPTER,
        trainable_params=ADAPTER,
        trainable_pct=1.15,
        flops_per_step=3.53e12,
        achieved_flops_per_s=0.89e12,
        mfu=0.0251,
        step_time_s={"mean": 3.96, "p50": 3.9},
        micro_step_time_s={"mean": 1.98, "p50": 1.9},
        train_s=1979.42,
        tokens_per_s=2069.0,
        peak_memory={"kind": "cuda", "peak_bytes": 5 * GIB},
        j_per_token=0.0201,
    )
    shared = {"model": MODEL, "data": "wikitext2-train", "max_steps": 500, "warmup_steps": 100, "precision": "fp16"}
    full_cfg = {**shared, "method": "full", "batch_size": 2, "grad_accum": 4, "learning_rate": 2e-5, "report_to": []}
    qlora_cfg = {**shared, "method": "qlora", "batch_size": 4, "grad_accum": 2, "learning_rate": 2e-4}
    qlora_cfg |= {"optimizer": "paged_adamw_8bit", "lora_r": 16, "lora_alpha": 32.0, "out": "runs/q"}
    qlora_cfg |= {"report_to": ["tensorboard"], "retired_option": 3}  # an option this lorafit does not know
    return [
        # `compare` stores an evaluation's model as its config
        RunRecord("base", "eval", "ok", {"model": MODEL}, eval=evaluation(18.0, 1.4, 35.7)),
        RunRecord("base-nf4", "eval", "ok", {"model": MODEL}, eval=evaluation(18.5, 4.5, 11.1, quantization=NF4)),
        RunRecord("full", "train", "ok", {**full_cfg, "out": "runs/f"}, full, evaluation(18.42, 1.51, 33.12)),
        RunRecord("qlora", "train", "ok", qlora_cfg, qlora, evaluation(21.87, 4.71, 10.62, quantization=NF4)),
    ]


def tables(html_text: str) -> list[dict[str, dict[str, str]]]:
    """Every table of the page as {first cell: {column: cell}}."""
    reader = TableReader()
    reader.feed(html_text)
    return [{row[0]: dict(zip(head, row, strict=True)) for row in rows} for head, *rows in reader.tables]


def four_bit_by_hand(quantized: int, double_quant: bool) -> float:
    """4 bits per weight + absmax per 64 weights: fp32, or (double quantization) 8-bit + fp32 per 256 blocks."""
    blocks = quantized / 64
    return quantized * 4 / 8 + (blocks * 8 / 8 + blocks / 256 * 32 / 8 if double_quant else blocks * 32 / 8)


NF4_DEPLOYED = four_bit_by_hand(QUANTIZED, True) + 2 * (BASE - QUANTIZED)  # the 4-bit base alone
QLORA_DEPLOYED = NF4_DEPLOYED + 2 * ADAPTER


# ---------------------------------------------------------------- Table 12


def test_the_split_the_tests_assume_is_tinyllamas():
    """The hand-made split adds up to the study's own counts (Tables 2 and 6)."""
    assert QUANTIZED + UNQUANTIZED == BASE and ADAPTER == 12_615_680
    assert compare.quantized_params(MODEL) == QUANTIZED


def test_table_12_columns_show_the_stored_numbers_in_their_units():
    cells = tables(render_html(study_records(), "t", command=[]))[0]
    full, qlora = cells["full"], cells["qlora"]
    assert (full["total params"], qlora["total params"]) == ("1100.05M", f"{(BASE + ADAPTER) / 1e6:.2f}M")
    assert (qlora["trainable params"], qlora["trainable %"]) == ("12.62M", "1.15%")
    # merged 16-bit: the study's 2,098.18 MB (MiB in fact: 2 B x 1,100,048,384 / 2^20)
    assert full["size as deployed"] == "2098.18 MiB" == f"{2 * BASE / MIB:.2f} MiB"
    assert qlora["size as deployed"] == f"{QLORA_DEPLOYED / MIB:.2f} MiB"
    assert full["compression vs 16-bit"] == "1.00x"
    assert qlora["compression vs 16-bit"] == f"{2 * BASE / QLORA_DEPLOYED:.2f}x"
    assert full["size on disk"] == f"{3e8 / MIB:.2f} MiB"  # what is there today, beside what ships
    assert (full["FLOPs / step"], qlora["FLOPs / step"]) == ("13.5 TFLOP", "3.53 TFLOP")
    assert (full["achieved TFLOP/s"], qlora["achieved TFLOP/s"]) == ("4.69", "0.89")
    assert (full["MFU"], qlora["MFU"]) == ("13.18%", "2.51%")
    # the optimizer step (Table 9's 2.88 s), not the 0.72 s micro-step
    assert (full["time / step"], qlora["time / step"]) == ("2.88 s", "3.96 s")
    assert (full["training time"], qlora["training time"]) == ("1441.2 s", "1979.4 s")
    assert (full["train tokens/s"], full["peak memory"], full["J / token"]) == ("2844.4", "12.00 GiB", "0.0123 J")
    # before -> after: full against the dense base, QLoRA against the 4-bit base it trained on
    assert (full["perplexity"], qlora["perplexity"]) == ("18.00 → 18.42", "18.50 → 21.87")
    assert (full["inference time"], qlora["inference time"]) == ("1.51 s (50 tokens)", "4.71 s (50 tokens)")
    assert (full["generation tokens/s"], qlora["generation tokens/s"]) == ("33.1", "10.6")


def test_the_bases_are_sized_as_they_ship():
    cells = tables(render_html(study_records(), "t", command=[]))[0]
    assert cells["base"]["size as deployed"] == f"{2 * BASE / MIB:.2f} MiB"
    assert cells["base-nf4"]["size as deployed"] == f"{NF4_DEPLOYED / MIB:.2f} MiB"
    assert cells["base-nf4"]["trainable params"] == "—" and cells["base"]["MFU"] == "—"


@pytest.mark.parametrize("double_quant", [True, False])
def test_deployed_size_follows_the_formula(double_quant):
    quantized, base, adapter = 64 * 256 * 3, 64 * 256 * 3 + 1000, 77
    expected = four_bit_by_hand(quantized, double_quant) + 2 * 1000 + 2 * 77
    assert deployed_bytes(base, adapter, quantized, double_quant) == pytest.approx(expected, rel=1e-12)
    # 4.127 bits per quantized weight with double quantization, 4.5 without (QLoRA paper, section 3)
    bits = (4 + 8 / 64 + 32 / (64 * 256)) if double_quant else 4.5
    assert compare.four_bit_bytes(quantized, double_quant) * 8 / quantized == pytest.approx(bits)
    assert deployed_bytes(base, adapter, quantized=0) == 2 * base  # dense: merged in 16-bit
    assert deployed_bytes(base, adapter, None, double_quant) is None  # a 4-bit split not known
    assert deployed_bytes(base, adapter, quantized, None) is None  # double quantization not known
    assert deployed_bytes(base, adapter, base + 1, double_quant) is None  # a split that cannot be this model


# ---------------------------------------------------------------- improvement against the baseline


def pct(value: float, reference: float, larger_is_better: bool) -> str:
    change = (value - reference) / reference * 100
    return f"{change if larger_is_better else -change:+.2f}%"


def test_improvement_against_the_first_training_run_and_perplexity_against_each_base():
    html_text = render_html(study_records(), "t", command=[])
    gains = tables(html_text)[1]
    q, full = gains["qlora"], gains["full"]
    assert "baseline: full;" in html_text and full["size as deployed"] == "baseline" and full["MFU"] == "baseline"
    assert q["size as deployed"] == pct(QLORA_DEPLOYED, 2 * BASE, False)
    assert q["trainable params"] == pct(ADAPTER, BASE, False) == "+98.85%"  # the study's "98.85% fewer"
    assert q["FLOPs / step"] == pct(3.53, 13.52, False) == "+73.89%"  # "73.9% less"
    assert q["MFU"] == f"{2.51 - 13.18:+.2f} pp" == "-10.67 pp"  # the study's -10.67%: percentage points
    assert q["time / step"] == pct(3.96, 2.88, False) and q["training time"] == pct(1979.42, 1441.24, False)
    assert q["training time"] == "-37.34%"  # "-37.3%"
    assert q["inference time"] == pct(4.71, 1.51, False) == "-211.92%"  # "-212.0%"
    assert q["generation tokens/s"] == pct(10.62, 33.12, True) == "-67.93%"  # "-67.9%"
    assert q["peak memory"] == pct(5, 12, False) and q["J / token"] == pct(0.0201, 0.0123, False)
    # by default perplexity is against the base each run started from
    assert q["perplexity"] == pct(21.87, 18.5, False) and full["perplexity"] == pct(18.42, 18.0, False)
    assert gains["base"]["MFU"] == "—" and gains["base"]["perplexity"] == "—"


def test_a_chosen_baseline_by_label_or_method():
    records = study_records()
    gains = tables(render_html(records, "t", command=[], baseline="full"))[1]
    assert gains["qlora"]["perplexity"] == pct(21.87, 18.42, False) == "-18.73%"  # Table 10's +18.73%
    assert gains["full"]["perplexity"] == "baseline"
    records[3].label = "qlora-r16"
    gains = tables(render_html(records, "t", command=[], baseline="qlora"))[1]  # a method names its first run
    assert gains["qlora-r16"]["training time"] == "baseline"
    assert gains["full"]["training time"] == pct(1441.24, 1979.42, False)
    assert "baseline: qlora-r16;" in render_markdown(records, "t", command=[], baseline="qlora")
    with pytest.raises(UserError, match="baseline 'dora' is no run label or method") as e:
        render_html(records, "t", command=[], baseline="dora")
    assert e.value.field == "baseline"


def test_inference_times_compare_only_over_the_same_number_of_tokens():
    records = study_records()
    records[3].eval["generation"]["new_tokens"] = 64
    gains = tables(render_html(records, "t", command=[]))[1]
    assert gains["qlora"]["inference time"] == "—"
    assert gains["qlora"]["generation tokens/s"] == pct(10.62, 33.12, True)  # a rate still compares


# ---------------------------------------------------------------- missing figures


def test_missing_figures_are_a_dash_never_an_estimate():
    old = RunRecord(
        "old",
        "train",
        "ok",
        {"method": "qlora", "model": "org/some-hub-model", "retired_option": 3},
        # schema v1: its step_time_s timed a micro-batch; no total_params, no train_s, no eval
        Summary.from_dict({"status": "ok", "method": "qlora", "step_time_s": {"mean": 0.5, "p50": 0.5}}),
    )
    hub = RunRecord(
        "hub",
        "train",
        "ok",
        {"method": "qlora", "model": "org/some-hub-model", "double_quant": True},
        Summary.from_dict(
            {
                "schema_version": 3,
                "status": "ok",
                "method": "qlora",
                "model": "org/some-hub-model",
                "total_params": 10**9,
                "trainable_params": 10**6,
            }
        ),  # fmt: skip
        {"perplexity": {"ppl": float("nan")}, "generation": {"total_s": "slow"}},
    )
    cells = tables(render_html([old, hub], "t", command=[]))[0]
    shown = [c for c in compare.COLUMNS if c[0] != "run"]
    assert all(cells["old"][name] == "—" for name, _ in shown)
    # a hub model's config is not read in a report: its 4-bit split is unknown, so no size is made up
    assert cells["hub"]["size as deployed"] == "—" and cells["hub"]["compression vs 16-bit"] == "—"
    assert cells["hub"]["total params"] == "1000.00M"
    assert (cells["hub"]["perplexity"], cells["hub"]["inference time"]) == ("—", "—")


def test_the_evaluation_record_is_read_by_type():
    e = Evaluation.from_dict(
        {"size": {"total_params": True, "disk_bytes": 5.0}, "generation": {"tokens_per_s": math.inf}, "new_key": 1}
    )
    assert (e.size.total_params, e.size.disk_bytes, e.generation.tokens_per_s) == (None, 5.0, None)
    assert e.perplexity.ppl is None and e.quantization is None  # absent parts: empty, and "not a 4-bit base"
    assert Evaluation.from_dict({"quantization": NF4}).quantization == EvalQuantization("nf4", True)


# ---------------------------------------------------------------- settings per run


def test_each_run_shows_the_settings_that_differ():
    html_text = render_html(study_records(), "t", command=[])
    settings = tables(html_text)[2]
    assert list(settings) == ["full", "qlora"]  # training runs only: an evaluation's config is its model
    full, qlora = settings["full"], settings["qlora"]
    # Table 3's differences; lora_r is absent from full's stored config
    assert (full["batch_size"], full["grad_accum"], full["learning_rate"]) == ("2", "4", "2e-05")
    assert (qlora["batch_size"], qlora["grad_accum"], qlora["learning_rate"]) == ("4", "2", "0.0002")
    assert (qlora["optimizer"], full["optimizer"], qlora["lora_r"], full["lora_r"]) == (
        "paged_adamw_8bit",
        "—",
        "16",
        "—",
    )
    assert (full["report_to"], qlora["report_to"]) == ("none", "tensorboard")
    assert "model" not in full and "out" not in full and "retired_option" not in full
    md = render_markdown(study_records(), "t", command=[])
    shared = "Shared by every run (not the defaults): model=random:tinyllama-1.1b, data=wikitext2-train"
    assert shared in md and "max_steps=500" in md and "precision=fp16" in md


# ---------------------------------------------------------------- Figure 1


def test_six_panels_in_the_studys_order_with_trainable_parameters_on_a_log_axis():
    rows = build_rows(study_records())
    fig = charts.six_panel(rows)
    titles = [ax.get_title().split(" (")[0] for ax in fig.axes]
    assert titles == ["Model size", "Training time", "Trainable parameters", "Perplexity", "MFU", "Inference speed"]
    size, time, trainable, ppl, mfu, speed = fig.axes
    assert trainable.get_yscale() == "log" and all(ax.get_yscale() == "linear" for ax in (size, time, mfu, speed))
    assert [p.get_height() for p in trainable.patches] == [BASE, ADAPTER]  # only the trained runs have it
    assert [t.get_text() for t in trainable.texts] == ["1.1B", "12.6M"]
    deployed = [2 * BASE, NF4_DEPLOYED, 2 * BASE, QLORA_DEPLOYED]  # base, base-nf4, full, qlora
    assert [p.get_height() for p in size.patches] == pytest.approx([b / MIB for b in deployed])
    assert [p.get_height() for p in mfu.patches] == pytest.approx([13.18, 2.51])
    assert [p.get_height() for p in speed.patches] == pytest.approx([35.7, 11.1, 33.12, 10.62])
    assert [p.get_height() for p in time.patches] == pytest.approx([1441.24, 1979.42])
    charts.pyplot().close(fig)


def test_the_report_keeps_the_radar_and_every_chart_embedded():
    reader = TableReader()
    reader.feed(render_html(study_records(), "t", command=[]))
    assert list(reader.charts) == ["six_panel", "radar", "memory_breakdown", "loss_curves"]
    rows = build_rows(study_records())
    nf4, qlora = charts.radar_scores(rows, rows[1]), charts.radar_scores(rows, rows[3])
    assert nf4[0] == pytest.approx(1.0)  # the smallest deployment: the 4-bit base alone
    assert qlora[0] == pytest.approx(NF4_DEPLOYED / QLORA_DEPLOYED) and qlora[1] == pytest.approx(0.0251 / 0.1318)
