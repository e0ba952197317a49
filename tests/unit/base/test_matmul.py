"""The fp32 CPU products lorafit writes itself give torch's results through either library, and the library is
the one asked for or the faster one measured."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lorafit.base import matmul
from lorafit.base.errors import UserError

pytestmark = pytest.mark.skipif(not matmul.onednn_available(), reason="this torch build has no oneDNN")


@pytest.fixture(params=["onednn", "blas"])
def backend(request: pytest.FixtureRequest, cpu_matmul) -> str:
    cpu_matmul(request.param)
    return request.param


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to fp32 summation order: 1e-5 of the largest element."""
    return bool(((a - b).abs().max() <= 1e-5 * b.abs().max()).item())


@pytest.mark.parametrize("rows", [37, 64, 650, 700])  # the BLAS; one block; 512, 128, a 10-row tail: BLAS; 60: again
def test_each_product_matches_torch(backend: str, rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(rows, 24, generator=g), torch.randn(40, 24, generator=g)
    update = torch.randn(rows, 40, generator=g)
    assert matmul.via_onednn(x, weight) == (backend == "onednn")
    assert close(matmul.linear(x, weight), x @ weight.t())
    assert close(matmul.matmul(update, weight), update @ weight)
    expected = update + x @ weight.t()
    onto = update.clone()
    assert matmul.linear_onto(onto, x, weight) is onto
    assert close(onto, expected)
    out = torch.full((rows, 40), float("nan"))
    assert matmul.linear_into(out, x, weight) is out
    assert close(out, x @ weight.t())


def test_linear_into_fills_every_row_block(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 40 fp32 columns = 160 bytes per row; 3 rows per block is under the smallest oneDNN block, which then
    # sets the size: 64, 64, 64, then rows 136-199 again for the last 8
    monkeypatch.setattr(matmul, "INTO_BLOCK_BYTES", 3 * 160)
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(200, 24, generator=g), torch.randn(40, 24, generator=g)
    out = torch.full((200, 40), float("nan"))
    assert matmul.linear_into(out, x, weight) is out
    assert close(out, x @ weight.t())
    assert matmul.into_block_bytes(200, 40) == 64 * 160  # the largest transient through oneDNN
    assert matmul.into_block_bytes(40, 40) == 0  # all on the BLAS, straight into the buffer


@given(rows=st.integers(0, 5000), largest=st.integers(1, 2048))
def test_row_blocks_cover_the_rows_once_in_bounded_counts(rows: int, largest: int) -> None:
    blocks = matmul.row_blocks(rows, largest)
    smallest = matmul.ONEDNN_ROWS[-1]
    kept = [i for block, skip, _ in blocks for i in range(block.start + skip, block.stop)]
    assert kept == list(range(rows))
    ours = [b for b in blocks if b.onednn]
    cap = max([size for size in matmul.ONEDNN_ROWS if size <= largest], default=smallest)
    sizes = [b.rows.stop - b.rows.start for b in ours]
    assert set(sizes) <= {size for size in matmul.ONEDNN_ROWS if size <= cap}
    assert all(b.skip == 0 for b in blocks[:-1]) and blocks[-1].skip < smallest if blocks else rows == 0
    body = sizes[:-1] if blocks and blocks[-1].skip else sizes
    assert body == sorted(body, reverse=True)
    assert all(body.count(size) == 1 for size in set(body) if size != cap)  # one of each smaller size
    theirs = [b.rows.stop - b.rows.start for b in blocks if not b.onednn]  # the BLAS: a short tail or all
    assert theirs in ([], [rows]) or (len(theirs) == 1 and theirs[0] < matmul.BLAS_TAIL_BELOW)
    assert (rows >= smallest) == bool(ours)


def test_onednn_sees_only_the_bounded_row_counts(cpu_matmul, monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN keeps memory for every product shape it runs (base.matmul): whatever the rows of a product,
    it sees only ONEDNN_ROWS rows, so 40 distinct row counts give it at most 4 shapes per product."""
    cpu_matmul("onednn")
    seen: set[tuple[int, ...]] = set()
    run = matmul.onednn_linear

    def recorded(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        seen.add((*x.shape, weight.shape[0]))
        return run(x, weight)

    monkeypatch.setattr(matmul, "onednn_linear", recorded)
    weight = torch.randn(40, 24)
    for rows in range(30, 2000, 49):
        x, update = torch.randn(rows, 24), torch.randn(rows, 40)
        assert close(matmul.linear(x, weight), x @ weight.t())
        assert close(matmul.linear_onto(update.clone(), x, weight), update + x @ weight.t())
        assert close(matmul.matmul(update, weight), update @ weight)
    assert {rows for rows, _, _ in seen} == set(matmul.ONEDNN_ROWS)
    assert seen <= {(rows, inner, out) for rows in matmul.ONEDNN_ROWS for inner, out in ((24, 40), (40, 24))}


def test_non_fp32_operands_stay_on_torch(backend: str) -> None:
    x, weight = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16)
    assert not matmul.via_onednn(x, weight)
    assert torch.equal(matmul.linear(x, weight), x @ weight.t())


@pytest.mark.parametrize("asked", ["auto", None])  # None: unset, the default
@pytest.mark.parametrize(
    ("rates", "chosen"),
    [
        ({"blas": 200.0, "onednn": 450.0}, "onednn"),
        ({"blas": 300.0, "onednn": 250.0}, "blas"),
        ({"blas": 300.0, "onednn": 320.0}, "blas"),  # within AUTO_MARGIN: a timing could go either way
    ],
)
def test_auto_takes_the_clearly_faster_library_and_is_the_default(
    asked: str | None, rates: dict[str, float], chosen: str, cpu_matmul, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With oneDNN's shapes bounded (row_blocks), the faster library here runs unless one is asked for."""
    if asked is None:
        monkeypatch.delenv("LORAFIT_CPU_MATMUL", raising=False)
        matmul.cpu_backend.cache_clear()
    else:
        cpu_matmul(asked)
    monkeypatch.setattr(matmul, "probe", lambda: rates)
    assert matmul.cpu_backend() == chosen
    assert matmul.via_onednn(torch.ones(2, 2), torch.ones(2, 2)) == (chosen == "onednn")


def test_the_probe_measures_both_libraries() -> None:
    rates = matmul.probe()
    assert set(rates) == {"blas", "onednn"}
    assert all(rate > 0.1 for rate in rates.values())  # GFLOP/s: any CPU running this does more


def test_an_unknown_choice_names_the_variable(cpu_matmul) -> None:
    cpu_matmul("mkl")
    with pytest.raises(UserError, match="LORAFIT_CPU_MATMUL='mkl'.*auto, onednn, blas"):
        matmul.cpu_backend()


def test_the_probe_leaves_torch_random_stream_alone() -> None:
    """`auto` probes at the first product, wherever in a run that falls: drawing its operands from torch's
    global generator shifted every later dropout mask, and a resumed run's losses left the uninterrupted one's."""
    matmul.probe.cache_clear()
    state = torch.get_rng_state()
    matmul.probe()
    assert torch.equal(torch.get_rng_state(), state)
