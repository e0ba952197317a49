"""Where a training step's time goes: self time per operator from a `lorafit train --profile-trace` run.

Trains with the given flags and --profile-trace, reads the Chrome trace back and attributes each CPU
operator's duration minus that of the operators nested in it (self time) to its name; prints the top
operators and their share of the traced micro-steps as JSON. On CPU every op is synchronous, so self
time is where the time went; on a GPU read the trace's kernels instead (Perfetto).

    python bench/where_time_goes.py -- --method lora --batch-size 4 --max-length 1024 --max-samples 16 \
        --train-on-prompt --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def self_times(events: list[dict]) -> dict[str, float]:
    """Self time (µs) per operator name: each event's duration less its direct children's, per thread."""
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function")]
    by_thread: dict[tuple, list[dict]] = collections.defaultdict(list)
    for e in ops:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    totals: dict[str, float] = collections.Counter()
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, children's time]
        for e in [*thread, None]:
            while stack and (e is None or e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]):
                done, children = stack.pop()
                if done["cat"] == "cpu_op":
                    totals[done["name"]] += done["dur"] - children
                if stack:
                    stack[-1][1] += done["dur"]
            if e is not None:
                stack.append([e, 0.0])
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--steps", type=int, default=2, help="micro-steps traced")
    ap.add_argument("lorafit_args", nargs="*", help="lorafit train flags (after --)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "lorafit", "train", *args.lorafit_args, "--profile-trace",
               "--profile-trace-steps", str(args.steps), "--out", str(out), "--json"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        trace = json.loads(gzip.decompress((out / "trace.json.gz").read_bytes()))
    totals = self_times(trace["traceEvents"])
    whole = sum(totals.values())
    top = sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]
    print(json.dumps({
        "flags": args.lorafit_args,
        "traced_micro_steps": args.steps,
        "operator_self_time_s": whole / 1e6,
        "untraced_tokens_per_s": summary["tokens_per_s"],
        "mfu": summary["mfu"],
        "top": [{"op": name, "self_s": t / 1e6, "share": t / whole} for name, t in top],
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
