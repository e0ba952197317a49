"""Holds a real training after one step until the test lets it go, so the browser test sees the run
half-way whatever the machine's pace (a tiny model writes all its rows within a second of starting).

Python imports this module at start-up when its directory is on PYTHONPATH (the browser tests' `lorafit ui`
and every `lorafit train` it launches inherit that). With LORAFIT_TEST_HOLD="STEP:FILE", once metrics.jsonl
has its row for STEP the training waits (at most HOLD_S) until FILE exists; without it nothing changes.
"""

from __future__ import annotations

import os
import time

HOLD_S = 120.0  # never hold a training forever: a test that died cannot release it


def _hold(step: int, gate: str) -> None:
    from lorafit.run import rundir

    write = rundir.MetricsLog.write

    def write_then_hold(self: rundir.MetricsLog, row: dict) -> None:
        write(self, row)
        if row.get("step") == step:
            deadline = time.monotonic() + HOLD_S
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.05)

    rundir.MetricsLog.write = write_then_hold  # type: ignore[method-assign]


_spec = os.environ.get("LORAFIT_TEST_HOLD")
if _spec:
    _step, _, _gate = _spec.partition(":")
    _hold(int(_step), _gate)
