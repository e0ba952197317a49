"""The fp32 CPU products lorafit writes itself give torch's results through either library, and the library is
the one asked for or the faster one measured."""

from __future__ import annotations

import pytest
import torch

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


def test_each_product_matches_torch(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(37, 24, generator=g), torch.randn(40, 24, generator=g)
    update = torch.randn(37, 40, generator=g)
    assert matmul.via_onednn(x, weight) == (backend == "onednn")
    assert close(matmul.linear(x, weight), x @ weight.t())
    assert close(matmul.matmul(update, weight), update @ weight)
    expected = update + x @ weight.t()
    onto = update.clone()
    assert matmul.linear_onto(onto, x, weight) is onto
    assert close(onto, expected)


def test_linear_into_fills_every_row_block(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 40 fp32 columns = 160 bytes per row; 3 rows per block leaves a short last block of 37 rows
    monkeypatch.setattr(matmul, "INTO_BLOCK_BYTES", 3 * 160)
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(37, 24, generator=g), torch.randn(40, 24, generator=g)
    out = torch.full((37, 40), float("nan"))
    assert matmul.linear_into(out, x, weight) is out
    assert close(out, x @ weight.t())


def test_non_fp32_operands_stay_on_torch(backend: str) -> None:
    x, weight = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16)
    assert not matmul.via_onednn(x, weight)
    assert torch.equal(matmul.linear(x, weight), x @ weight.t())


def test_auto_takes_the_faster_library(cpu_matmul, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_matmul("auto")
    for rates, chosen in (({"blas": 200.0, "onednn": 450.0}, "onednn"), ({"blas": 300.0, "onednn": 250.0}, "blas")):
        monkeypatch.setattr(matmul, "probe", lambda rates=rates: rates)
        matmul.cpu_backend.cache_clear()
        assert matmul.cpu_backend() == chosen


def test_the_blas_is_the_default(cpu_matmul, monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN keeps memory per product shape it has run (base.matmul): only on request."""
    monkeypatch.delenv("LORAFIT_CPU_MATMUL", raising=False)
    matmul.cpu_backend.cache_clear()
    assert matmul.cpu_backend() == "blas"
    assert not matmul.via_onednn(torch.ones(2, 2), torch.ones(2, 2))


def test_the_probe_measures_both_libraries() -> None:
    rates = matmul.probe()
    assert set(rates) == {"blas", "onednn"}
    assert all(rate > 0.1 for rate in rates.values())  # GFLOP/s: any CPU running this does more


def test_an_unknown_choice_names_the_variable(cpu_matmul) -> None:
    cpu_matmul("mkl")
    with pytest.raises(UserError, match="LORAFIT_CPU_MATMUL='mkl'.*blas, onednn, auto"):
        matmul.cpu_backend()
