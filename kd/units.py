"""Numbers for people: bytes, FLOPs, durations and shares as kd prints them.

Every report, table and log line of kd formats its numbers here, so one quantity reads the
same everywhere. Standard library only; imports nothing of kd (the top layer of kd/README.md).
"""

from __future__ import annotations

import math

BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB")
SI_UNITS = ("KB", "MB", "GB", "TB")
FLOP_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def format_bytes(n: float, si: bool = False) -> str:
    """``n`` bytes in binary units (B, KiB, MiB, GiB, TiB, as nvidia-smi's MiB); with ``si``,
    in powers of 1000 (B, KB, MB, GB, TB, as disks are sold).

    Example:
        >>> format_bytes(0), format_bytes(1023), format_bytes(1024), format_bytes(1536 * 1024)
        ('0 B', '1,023 B', '1.00 KiB', '1.50 MiB')
        >>> format_bytes(3 * 1024**3), format_bytes(-2 * 1024**4), format_bytes(6144, si=True)
        ('3.00 GiB', '-2.00 TiB', '6.14 KB')
    """
    base, units = (1000, SI_UNITS) if si else (1024, BINARY_UNITS)
    if abs(n) < base:
        return f"{n:,.0f} B"
    for unit in units:
        n /= base
        if abs(n) < base or unit == units[-1]:
            break
    return f"{n:,.2f} {unit}"


def format_flops(n: float, per_s: bool = False) -> str:
    """``n`` floating-point operations (``per_s``: a rate) with a k/M/G/T/P prefix.

    Example:
        >>> format_flops(16.7e9), format_flops(1.5e12, per_s=True), format_flops(999)
        ('16.70 GFLOP', '1.50 TFLOP/s', '999 FLOP')
    """
    unit = "FLOP/s" if per_s else "FLOP"
    for scale, prefix in FLOP_PREFIXES:
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def format_duration(seconds: float) -> str:
    """Seconds in µs, ms or s, whichever reads best (reports and tables).

    Example:
        >>> format_duration(0), format_duration(0.0005), format_duration(0.25), format_duration(1)
        ('0 µs', '500 µs', '250.0 ms', '1.00 s')
    """
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if abs(seconds) < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:,.2f} s"


def format_seconds(value: float) -> str:
    """Seconds in three significant digits, never an exponent, no space (compact log lines).

    Example:
        >>> format_seconds(0.0005), format_seconds(0.61), format_seconds(8.41), format_seconds(123)
        ('0.0005s', '0.61s', '8.41s', '123s')
    """
    if abs(value) >= 100 or not math.isfinite(value):
        return f"{value:.0f}s"
    if value == 0:
        return "0s"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".") + "s"


def format_percent(value: float, fine: bool = False) -> str:
    """A fraction (0.25) as a percentage with one decimal; ``fine`` keeps three decimals below
    0.1 % (the MFU of tiny models).

    Example:
        >>> format_percent(0.25), format_percent(0.00012), format_percent(0.00012, fine=True)
        ('25.0 %', '0.0 %', '0.012 %')
    """
    if fine and 0 < value < 1e-3:
        return f"{100 * value:.3f} %"
    return f"{100 * value:.1f} %"
