"""Peak RSS by phase of a `lorafit train` run: each step's forward (with the loss), backward, clipping and
optimizer step.

Estimating a peak needs to know when it comes (`measurement.estimate.full_cpu_peak`). This runs `lorafit train`
in this process, with the allocator lorafit would choose (re-executing once with it preloaded, as the CLI does),
and at each phase boundary reads the process's high-water mark (VmHWM) and resets it (`/proc/self/clear_refs`,
5; Linux only), so each figure is the most RSS held during that phase. "other" is what runs between a step's
update and the next forward (data, logging). It prints one JSON line: the phases of every step, in bytes.
The resets also reach the run's own measurements: its summary.json peak (and a --memory-budget check) then covers
only the last phase, so read peaks from this output, not from that run. A step skipped for a non-finite loss
merges into the next; what runs after the last update (the final save) is not reported.

    python bench/peak_phases.py --model random:qwen2.5-0.5b --method full --max-steps 3 --data wikitext2 --out /tmp/p
"""

from __future__ import annotations

import json
import sys
from typing import Any

from lorafit.base.allocator import reexec_with_allocator
from lorafit.measurement.host_memory import peak_rss_bytes, reset_peak_rss


class Phases:
    """Each step's peak per phase (the most over its micro-batches where a phase repeats)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, int]] = [{}]

    def end(self, phase: str) -> None:
        step = self.steps[-1]
        step[phase] = max(step.get(phase, 0), peak_rss_bytes())
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs: Linux >= 4.0)")
        if phase == "optimizer_step":
            self.steps.append({})


def install(phases: Phases) -> None:
    """Mark the boundaries: around the loss module's forward, after each micro-step's backward, around the
    optimizer's step (torch's global step hooks)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from lorafit.training import loop
    from lorafit.training.loss import LossModule

    forward, micro_step = LossModule.forward, loop.micro_step

    def marked_forward(self: LossModule, *args: Any, **kwargs: Any) -> Any:
        phases.end("other")
        out = forward(self, *args, **kwargs)
        phases.end("forward")
        return out

    def marked_micro_step(*args: Any, **kwargs: Any) -> None:
        micro_step(*args, **kwargs)
        phases.end("backward")

    LossModule.forward = marked_forward
    loop.micro_step = marked_micro_step
    register_optimizer_step_pre_hook(lambda *_: phases.end("clip"))
    register_optimizer_step_post_hook(lambda *_: phases.end("optimizer_step"))


def main() -> None:
    reexec_with_allocator([__file__, *sys.argv[1:]])
    from lorafit.cli.main import main as lorafit

    phases = Phases()
    install(phases)
    sys.argv = ["lorafit", "train", *sys.argv[1:]]
    try:
        lorafit()
    except SystemExit as e:
        if e.code:
            raise
    print(json.dumps({"args": sys.argv[2:], "steps": [s for s in phases.steps if s]}))


if __name__ == "__main__":
    main()
