"""This process's resident memory (RSS) and its high-water mark, read from /proc where Linux offers it.

On CPU runs the peak RSS of the training window is the peak memory lorafit reports; resetting the
high-water mark after loading keeps the loading spike out of it.
"""

from __future__ import annotations

import re
from pathlib import Path


def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """High-water RSS (since the last reset) of this process."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0) so the peak covers training, not loading."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
