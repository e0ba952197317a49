"""Which precision a command computes in: bf16 only where the GPU has bf16 tensor cores (compute capability 8.0+).

No GPU here: torch.cuda is faked with monkeypatch. `torch.cuda.is_bf16_supported()` answers True on a T4
or V100 (it counts emulation), which is exactly what `auto` must not trust.
"""

import warnings

import pytest
import torch

from lorafit.base import device
from lorafit.base.errors import UserError


def fake_gpu(monkeypatch, capability: tuple[int, int], bf16_emulated: bool = True) -> None:
    """A visible GPU of the given compute capability; is_bf16_supported behaves as torch's does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    native = capability >= (8, 0)
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: native or (including_emulation and bf16_emulated),
    )


@pytest.mark.parametrize("capability", [(7, 5), (7, 0)])  # T4, V100
def test_auto_is_fp16_below_ampere_although_torch_counts_emulated_bf16(monkeypatch, capability):
    fake_gpu(monkeypatch, capability)
    assert device.resolve_precision("auto", "cuda") == "fp16"
    assert device.compute_dtype("auto", "cuda") == torch.float16
    assert not device.bf16_supported("cuda")


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_auto_is_bf16_from_compute_capability_8(monkeypatch, capability):
    fake_gpu(monkeypatch, capability)
    assert device.resolve_precision("auto", "cuda") == "bf16"
    assert device.compute_dtype("auto", "cuda") == torch.bfloat16


def test_auto_on_cpu_is_fp32_whatever_the_gpu(monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    assert device.resolve_precision("auto", "cpu") == "fp32"


def test_bf16_ok_answers_for_a_gpu_that_is_not_here(monkeypatch):
    def no_gpu(*a, **k):
        raise AssertionError("estimate must not ask the local GPU")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_gpu)
    assert device.resolve_precision("auto", "cuda", bf16_ok=True) == "bf16"
    assert device.resolve_precision("auto", "cuda", bf16_ok=False) == "fp16"
    assert device.resolve_precision("bf16", "cuda", bf16_ok=False) == "bf16"


def test_explicit_bf16_below_ampere_runs_emulated_with_a_warning(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    with pytest.warns(UserWarning, match="emulated"):
        assert device.resolve_precision("bf16", "cuda") == "bf16"


def test_explicit_bf16_on_a_gpu_without_any_bf16_is_refused(monkeypatch):
    fake_gpu(monkeypatch, (6, 1), bf16_emulated=False)
    with pytest.raises(UserError) as e:
        device.resolve_precision("bf16", "cuda")
    assert e.value.field == "precision"


def test_explicit_choices_on_capable_devices_pass_silently(monkeypatch):
    fake_gpu(monkeypatch, (8, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device.resolve_precision("bf16", "cuda") == "bf16"
        assert device.resolve_precision("fp16", "cuda") == "fp16"
        assert device.resolve_precision("fp32", "cuda") == "fp32"
        assert device.resolve_precision("bf16", "cpu") == "bf16"  # allowed on CPU (slow without bf16 units)
        assert device.resolve_precision("fp32", "cpu") == "fp32"


def test_fp16_on_cpu_is_refused():
    with pytest.raises(UserError, match="fp16 needs a GPU") as e:
        device.resolve_precision("fp16", "cpu")
    assert e.value.field == "precision"


def fake_cpu(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    """A CPU with or without bf16 units, as torch's feature checks report them."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "units"), [(False, False, None), (True, False, "AVX512-BF16"), (True, True, "AMX")]
)
def test_cpu_bf16_units_are_read_from_torchs_feature_checks(monkeypatch, avx512_bf16, amx, units):
    fake_cpu(monkeypatch, avx512_bf16, amx)
    assert device.cpu_bf16_units() == units


def test_auto_in_fp32_on_a_cpu_with_bf16_units_suggests_bf16(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=True, amx=False)
    hint = device.precision_hint("auto", "cpu")
    assert hint is not None and "AVX512-BF16" in hint and "--precision bf16" in hint
    assert device.resolve_precision("auto", "cpu") == "fp32"  # the hint suggests; auto itself is unchanged


@pytest.mark.parametrize(
    ("requested", "kind", "units"), [("fp32", "cpu", True), ("auto", "cuda", True), ("auto", "cpu", False)]
)
def test_no_precision_hint_for_a_chosen_precision_a_gpu_or_a_cpu_without_bf16_units(
    monkeypatch, requested, kind, units
):
    fake_cpu(monkeypatch, avx512_bf16=units, amx=False)
    assert device.precision_hint(requested, kind) is None
