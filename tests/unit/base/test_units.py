"""Byte sizes in and out (base.units): GB = 10⁹ and GiB = 2³⁰ whichever way a size goes, printed memory
in binary units labelled KiB/MiB/GiB, and a size the user typed echoed as typed with its binary value."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lorafit.base.errors import UserError
from lorafit.base.units import GiB, MiB, format_budget, format_bytes, parse_bytes

DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
BINARY = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
UNITS = {"B": 1, **DECIMAL, **BINARY}
SHOWN = re.compile(r"(-?\d+(?:\.\d+)?) (B|KiB|MiB|GiB|TiB)")


def test_constants_are_powers_of_two():
    assert (GiB, MiB) == (1 << 30, 1 << 20)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GB", 8_000_000_000),
        ("8 GiB", 8 << 30),
        ("512MiB", 512 << 20),
        ("1.5gb", 1_500_000_000),
        ("100", 100),
        ("2kb", 2000),
        ("2KiB", 2048),
        ("1TB", 10**12),
        (" 3 B ", 3),
    ],
)
def test_parse_bytes_decimal_and_binary(text, expected):
    assert parse_bytes(text, "memory_budget") == expected


@pytest.mark.parametrize("text", ["2.01GB", "2.03MB", "0.29GB", "4.35GiB"])
def test_parse_bytes_is_exact_for_decimal_fractions(text):
    """A float product truncates 2.01·10⁹ to 2,009,999,999; the size typed is exact in decimal."""
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    assert parse_bytes(text, "budget") == int(Fraction(number) * UNITS[unit])


@pytest.mark.parametrize("text", ["lots", "8 GBs", "-1GB", "0", "0GB", "0.0001B", "", "1e9", "8 G B"])
def test_parse_bytes_refuses_and_names_the_field(text):
    with pytest.raises(UserError) as info:
        parse_bytes(text, "memory_budget")
    assert info.value.field == "memory_budget"


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (8 * 10**9, f"{8e9 / 2**30:.2f} GiB"),
        (8 << 30, "8.00 GiB"),
        (3 << 40, "3.00 TiB"),
        (5000 << 40, "5000.00 TiB"),
        (-(3 << 20), "-3.00 MiB"),
        (None, "n/a"),
    ],
)
def test_format_bytes_picks_the_binary_unit(n, shown):
    assert format_bytes(n) == shown


def test_eight_gigabytes_print_as_gibibytes_never_as_gb():
    assert format_bytes(8 * 10**9) == "7.45 GiB"  # 8·10⁹ / 2³⁰ = 7.4506
    assert format_bytes(8 * 10**9, "GB") == "8.00 GB"


@pytest.mark.parametrize(("n", "shown"), [(2**20 - 1, "1.00 MiB"), (2**30 - 2**10, "1.00 GiB"), (1023.6, "1.00 KiB")])
def test_format_bytes_moves_up_a_unit_when_rounding_reaches_1024(n, shown):
    assert format_bytes(n) == shown


def test_format_bytes_in_a_given_unit_and_digits():
    assert format_bytes(3 * 2**29, "GiB") == "1.50 GiB"
    assert format_bytes(1_500_000_000, "gb", digits=1) == "1.5 GB"
    assert format_bytes(8 * 10**9, "B") == "8000000000 B"  # whole bytes, no decimals
    assert format_bytes(128 << 20, "MiB", digits=0) == "128 MiB"
    assert format_bytes(None, "GiB", missing="") == ""
    with pytest.raises(ValueError, match="unknown byte unit"):
        format_bytes(1, "GiBs")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("8GB", f"8GB ({8e9 / 2**30:.2f} GiB)"),
        (" 24 GB ", f"24 GB ({24e9 / 2**30:.2f} GiB)"),
        ("1MB", f"1MB ({1e6 / 2**10:.2f} KiB)"),  # the largest unit that keeps it >= 1
        ("8GiB", "8GiB"),
        ("4 GiB", "4 GiB"),
    ],
)
def test_format_budget_echoes_the_text_with_its_binary_value(text, shown):
    assert format_budget(text) == shown


def test_format_budget_refuses_what_parse_bytes_refuses():
    with pytest.raises(UserError):
        format_budget("lots")


# ---------------------------------------------------------------- round trips

sizes = st.integers(min_value=1, max_value=2**44)
units = st.sampled_from(sorted(UNITS))


@given(k=st.integers(min_value=1, max_value=10**6), unit=units, space=st.sampled_from(["", " "]))
def test_whole_sizes_parse_exactly(k, unit, space):
    assert parse_bytes(f"{k}{space}{unit}", "x") == k * UNITS[unit]


@given(n=sizes)
def test_printed_sizes_parse_back_within_their_last_digit(n):
    shown = format_bytes(n)
    number, unit = SHOWN.fullmatch(shown).groups()
    assert unit == "B" or 1 <= float(number) < 1024 or unit == "TiB"
    back = parse_bytes(shown, "x")
    # two decimals: the printed number is within half a hundredth of the unit (plus the byte dropped)
    assert abs(back - n) <= UNITS[unit] / 200 + 1


@given(n=sizes, unit=units, digits=st.integers(min_value=0, max_value=4))
def test_sizes_in_any_unit_parse_back_within_their_last_digit(n, unit, digits):
    shown = format_bytes(n, unit, digits=digits)
    assert shown.endswith(" " + unit)
    assume(float(shown.split()[0]) > 0)  # "0 GB" is printable but is no size to parse
    step = 1 if unit == "B" else UNITS[unit] / 10**digits
    assert abs(parse_bytes(shown, "x") - n) <= step / 2 + 1


@given(k=st.integers(min_value=1, max_value=10**5), unit=st.sampled_from(sorted(DECIMAL)))
def test_a_decimal_budget_shows_its_text_and_the_binary_value_it_parses_to(k, unit):
    text = f"{k}{unit}"
    assert format_budget(text) == f"{text} ({format_bytes(k * DECIMAL[unit])})"


@given(k=st.integers(min_value=1, max_value=10**5), unit=st.sampled_from(sorted(BINARY)))
def test_a_binary_budget_is_shown_as_typed(k, unit):
    assert format_budget(f"{k}{unit}") == f"{k}{unit}"
