"""Byte sizes in and out: one parser and one formatter, so a size a user types and a size lorafit
prints mean the same thing.

Decimal units are powers of ten and binary units powers of two, as IEC 80000-13 defines them:
1 GB = 10⁹ bytes, 1 GiB = 2³⁰ bytes. lorafit prints memory in binary units (GPU memory and page
sizes are binary; an "8 GB" card holds 8 GiB) and always labels them so; a size the user gave is
echoed as given, with its binary value beside it.
"""

from __future__ import annotations

import re
from fractions import Fraction

from lorafit.base.errors import UserError

BYTE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# how units are spelled when printed: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB
UNIT_NAMES = {key: key.upper().replace("I", "i") for key in BYTE_UNITS}
BINARY_STEPS = ("b", "kib", "mib", "gib", "tib")  # what format_bytes picks from, smallest first
GiB = 2**30
MiB = 2**20
SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)


def parse_bytes(text: str, field_name: str) -> int:
    """'8GB' -> 8·10⁹, '512MiB' -> 512·2²⁰, '1024' -> 1024 bytes; a clear error naming the field for
    anything else. The number is read exactly (as a fraction, not a float: 2.01GB is 2,010,000,000
    bytes, where a float product gives 2,009,999,999) and a fraction of a byte is dropped, so a budget
    is never rounded up; a size under one byte is refused."""
    m = SIZE.fullmatch(str(text))
    if not m:
        raise UserError(f"expected a size like 8GB or 512MiB, got {text!r}", field=field_name)
    n = int(Fraction(m.group(1)) * BYTE_UNITS[(m.group(2) or "b").lower()])
    if n < 1:
        raise UserError(f"size must be at least 1 byte, got {text!r}", field=field_name)
    return n


def _binary_unit(n: float, digits: int) -> str:
    """The largest binary unit in which `n` shows as at least 1, moving up when rounding to `digits`
    would show 1024 (1,048,575 bytes is 1.00 MiB, not 1024.00 KiB)."""
    for key in BINARY_STEPS[:-1]:
        if round(abs(n) / BYTE_UNITS[key], 0 if key == "b" else digits) < 1024:
            return key
    return BINARY_STEPS[-1]


def format_bytes(n: float | None, unit: str | None = None, missing: str = "n/a", digits: int = 2) -> str:
    """Bytes for people. Without `unit`: the largest binary unit (B, KiB, MiB, GiB, TiB) that keeps the
    number at least 1. With `unit` ("GB", "GiB", "MB", ...): always that unit. Bytes are whole (no
    decimals); `missing` stands for an unknown size (None)."""
    if n is None:
        return missing
    key = _binary_unit(n, digits) if unit is None else unit.lower()
    if key not in BYTE_UNITS:
        raise ValueError(f"unknown byte unit {unit!r}; one of {', '.join(UNIT_NAMES.values())}")
    if key == "b":
        return f"{n:.0f} B"
    return f"{n / BYTE_UNITS[key]:.{digits}f} {UNIT_NAMES[key]}"


def format_budget(text: str) -> str:
    """A size the user typed, as typed, with its binary value: '8GB (7.45 GiB)'; a binary size is
    already what lorafit prints, so '8GiB' stays '8GiB'. Refuses what parse_bytes refuses."""
    n = parse_bytes(text, "budget")
    typed = str(text).strip()
    return typed if "i" in typed.lower() else f"{typed} ({format_bytes(n)})"
