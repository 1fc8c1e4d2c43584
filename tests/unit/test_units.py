"""kd.units: each format at zero, at its unit boundaries and for negative numbers."""

from __future__ import annotations

import pytest

from kd.units import format_bytes, format_duration, format_flops, format_percent, format_seconds


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (512, "512 B"), (1023, "1,023 B"), (1024, "1.00 KiB"),
    (2**20 - 2**10, "1,023.00 KiB"), (2**20, "1.00 MiB"), (22.5 * 2**20, "22.50 MiB"),
    (3 * 2**30, "3.00 GiB"), (2**40, "1.00 TiB"), (2**50, "1,024.00 TiB"), (-1536, "-1.50 KiB"),
])
def test_format_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(("n", "text"), [
    (999, "999 B"), (1000, "1.00 KB"), (6144, "6.14 KB"), (20e9, "20.00 GB"), (2e15, "2,000.00 TB"),
])
def test_format_bytes_si(n: float, text: str) -> None:
    assert format_bytes(n, si=True) == text


def test_format_flops() -> None:
    assert format_flops(0) == "0 FLOP" and format_flops(999) == "999 FLOP"
    assert format_flops(1e3) == "1.00 kFLOP" and format_flops(16.7e9) == "16.70 GFLOP"
    assert format_flops(1.5e12, per_s=True) == "1.50 TFLOP/s"
    assert format_flops(2e18) == "2,000.00 PFLOP" and format_flops(-2e9) == "-2.00 GFLOP"


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 µs"), (0.0005, "500 µs"), (0.001, "1.0 ms"), (0.25, "250.0 ms"), (1, "1.00 s"),
    (2.5, "2.50 s"), (4000, "4,000.00 s"), (-0.25, "-250.0 ms"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("value", "text"), [
    (0.0005, "0.0005s"), (0.61, "0.61s"), (8.41, "8.41s"), (0, "0s"), (1.0, "1s"),
    (99.99, "100s"), (100, "100s"), (123.4, "123s"), (0.01234, "0.0123s"), (-500, "-500s"),
    (-0.5, "-0.5s"), (float("nan"), "nans"),
])
def test_format_seconds(value: float, text: str) -> None:
    assert format_seconds(value) == text


def test_format_percent() -> None:
    assert format_percent(0) == "0.0 %" and format_percent(0.5) == "50.0 %"
    assert format_percent(-0.25) == "-25.0 %" and format_percent(1.5) == "150.0 %"
    assert format_percent(0.00012, fine=True) == "0.012 %"
    assert format_percent(0.001, fine=True) == "0.1 %"  # at 0.1 % the usual decimal again
    assert format_percent(0, fine=True) == "0.0 %" and format_percent(0.5, fine=True) == "50.0 %"
