"""Library chatter stays off the user's terminal: the `lorafit` entry point in a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Pretends this CPU has AVX512-BF16: importing bitsandbytes then looks for the optional `kernels`
# package and, without it, logs "Failed to load CPU gemm_4bit_forward from kernels-community" as a
# warning (bitsandbytes/backends/cpu/ops.py), as it does on such CPUs.
AVX512_BF16_CPU = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys

    class _AVX512BF16(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name != "bitsandbytes.functional":
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            self.inner, spec.loader = spec.loader, self
            return spec

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            self.inner.exec_module(module)
            module.has_avx512bf16 = lambda: True

    sys.meta_path.insert(0, _AVX512BF16())
    """
)
NOISE = "Failed to load CPU gemm_4bit_forward"


def _lorafit_on_avx512_bf16_cpu(tmp_path, *args: str, verbose: bool = False) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(AVX512_BF16_CPU)
    env = {k: v for k, v in os.environ.items() if k != "LORAFIT_VERBOSE"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    if verbose:
        env["LORAFIT_VERBOSE"] = "1"
    return subprocess.run([sys.executable, "-m", "lorafit", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("args", [["archs"], ["estimate", "--model", "random:tiny", "--max-length", "64"]])
def test_library_noise_stays_off_the_terminal(tmp_path, args):
    proc = _lorafit_on_avx512_bf16_cpu(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert NOISE not in proc.stderr


def test_lorafit_verbose_shows_library_noise(tmp_path):
    proc = _lorafit_on_avx512_bf16_cpu(tmp_path, "estimate", "--model", "random:tiny", verbose=True)
    assert proc.returncode == 0, proc.stderr
    assert NOISE in proc.stderr  # the simulated CPU does make bitsandbytes say it
