"""The peak FLOP/s MFU divides by: whole GPU names, per dtype, measured where the table has no figure.

Expected figures are NVIDIA's published dense tensor-core peaks with FP32 accumulate (see the comments
in measurement/flops.py), rounded as the data sheets round them.
"""

import pytest
import torch

from lorafit.measurement import flops

T = 1e12


@pytest.mark.parametrize(
    "name, model",
    [
        ("NVIDIA GeForce RTX 4060 Ti", "RTX 4060 Ti"),
        ("NVIDIA GeForce RTX 4060", "RTX 4060"),
        ("NVIDIA GeForce RTX 4070 Ti", "RTX 4070 Ti"),
        ("NVIDIA GeForce RTX 4070", "RTX 4070"),
        ("NVIDIA GeForce RTX 3060", "RTX 3060"),
        ("NVIDIA GeForce RTX 5090", "RTX 5090"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ("Tesla V100-PCIE-32GB", "V100 PCIe"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
    ],
)
def test_device_names_match_whole_models(name, model):
    assert flops.gpu_model(name) == model


@pytest.mark.parametrize(
    "name",
    [
        "Some Future GPU",
        "NVIDIA H100 NVL",  # another H100 with other clocks: not the SXM figure
        "NVIDIA GeForce RTX 4090 D",  # 114 SMs, not the 4090's 128
        "NVIDIA GeForce RTX 3060 Laptop GPU",  # laptop clocks
        "NVIDIA GeForce RTX 3090 Ti",
        "NVIDIA A100X",
    ],
)
def test_unknown_or_other_variants_have_no_figure(name):
    assert flops.gpu_model(name) is None
    assert flops.gpu_peak_flops(name, torch.float16) is None
    assert flops.gpu_peak_flops(name, torch.bfloat16) is None


def test_prefixes_do_not_pick_a_smaller_card():
    ti, plain = flops.gpu_peak_flops("NVIDIA GeForce RTX 4060 Ti"), flops.gpu_peak_flops("NVIDIA GeForce RTX 4060")
    assert ti == pytest.approx(44.1 * T, rel=0.01) and plain == pytest.approx(30.2 * T, rel=0.01)
    assert flops.gpu_peak_flops("NVIDIA L40") == pytest.approx(181 * T, rel=0.01)
    assert flops.gpu_peak_flops("NVIDIA L4") == pytest.approx(121 * T, rel=0.01)
    assert flops.gpu_peak_flops("NVIDIA L40S") == pytest.approx(362 * T, rel=0.01)
    assert flops.gpu_peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989 * T, rel=0.001)
    assert flops.gpu_peak_flops("NVIDIA H100 PCIe") == pytest.approx(756 * T, rel=0.001)


def test_bf16_has_no_figure_where_it_is_emulated():
    for name in ("Tesla T4", "Tesla V100-SXM2-16GB", "Tesla V100-PCIE-16GB"):
        assert flops.gpu_peak_flops(name, torch.bfloat16) is None
        assert flops.gpu_peak_flops(name, torch.float16) > 0
    assert flops.gpu_peak_flops("Tesla T4", torch.float16) == pytest.approx(65 * T, rel=0.01)
    assert flops.gpu_peak_flops("NVIDIA A100-SXM4-40GB", torch.bfloat16) == pytest.approx(312 * T, rel=0.001)


def test_fp32_has_no_table_figure():
    assert flops.gpu_peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) is None


def test_every_entry_has_a_positive_fp16_peak_and_is_reachable_by_its_own_name():
    assert len(flops.GPU_PEAKS) >= 23
    for model, peak in flops.GPU_PEAKS.items():
        assert peak.fp16 > 0, model
        assert peak.bf16 is None or peak.bf16 > 0, model
        assert flops.gpu_model(f"NVIDIA {model}") == model
        assert peak.source, model


@pytest.fixture
def fake_cuda(monkeypatch):
    """A GPU named as asked, and a measured peak that records its dtype (no GPU here)."""
    measured: list[torch.dtype] = []

    def measure(device, dtype, n=2048, reps=10):
        measured.append(dtype)
        return 1.5 * T

    monkeypatch.setattr(flops, "measured_matmul_peak", measure)

    def use(name: str) -> list[torch.dtype]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
        return measured

    return use


def test_peak_flops_is_the_peak_of_the_dtype_used(fake_cuda):
    gpu = torch.device("cuda")
    measured = fake_cuda("Tesla T4")
    peak, source = flops.peak_flops(gpu, torch.float16)
    assert peak == pytest.approx(65 * T, rel=0.01) and "T4" in source and not measured
    peak, source = flops.peak_flops(gpu, torch.bfloat16)  # emulated on a T4: no data-sheet figure
    assert (peak, measured) == (1.5 * T, [torch.bfloat16]) and "measured" in source
    peak, source = flops.peak_flops(gpu, torch.float32)
    assert (peak, measured[-1]) == (1.5 * T, torch.float32) and "measured" in source


def test_peak_flops_uses_the_whole_name(fake_cuda):
    fake_cuda("NVIDIA GeForce RTX 4060 Ti")
    peak, source = flops.peak_flops(torch.device("cuda"), torch.bfloat16)
    assert peak == pytest.approx(44.1 * T, rel=0.01) and "RTX 4060 Ti" in source
    measured = fake_cuda("NVIDIA GeForce RTX 4090 D")
    peak, source = flops.peak_flops(torch.device("cuda"), torch.bfloat16)
    assert (peak, measured) == (1.5 * T, [torch.bfloat16]) and "measured" in source


def test_derived_figures_use_the_rate_that_reproduces_the_whitepapers():
    """Derived entries are SMs x boost x 512 FLOP/clk/SM; that rate gives NVIDIA's published GeForce figures."""
    for sms, mhz, published in [(128, 2520, 165.2), (76, 2505, 97.5), (82, 1695, 71)]:  # 4090, 4080 (Ada), 3090
        assert flops._derived(sms, mhz, 512)[0] == pytest.approx(published * T, rel=0.003)
    derived = {"RTX 4070 Ti": 80.2, "RTX 4070": 58.3, "RTX 4060 Ti": 44.1, "RTX 4060": 30.2, "RTX 5090": 209.5}
    for model, published in derived.items():  # the Ada whitepaper's FP32-accumulate figures; 5090: 838 / 4
        assert flops.GPU_PEAKS[model].fp16 == pytest.approx(published * T, rel=0.003), model
        assert "derived" in flops.GPU_PEAKS[model].source


def test_measuring_the_peak_leaves_torch_random_stream_alone() -> None:
    """The peak is measured once per run, at the first MFU figure: drawing its operands from torch's global
    generator would move every later random draw of the run (dropout masks, shuffles)."""
    flops.measured_matmul_peak.cache_clear()
    state = torch.get_rng_state()
    flops.measured_matmul_peak(torch.device("cpu"), torch.float32, n=256, reps=1)
    assert torch.equal(torch.get_rng_state(), state)
