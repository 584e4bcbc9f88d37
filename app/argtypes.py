"""argparse `type=` validators: a bad value exits 2 with the usage line, before any heavy import.

Each converter raises `argparse.ArgumentTypeError` with a message that starts with the flag, e.g.
`--temperature must be >= 0 and finite, got nan`; the CLI's parser prints it as one line,
`mixtral-chat: error: <message>`, after the usage line. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence


def _parse_int(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} expects an integer, got {text!r}") from None


def _parse_float(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} expects a number, got {text!r}") from None


def int_range(flag: str, low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (a bound of None is open)."""

    def convert(text: str) -> int:
        value = _parse_int(flag, text)
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                bound = "a positive integer" if low == 1 else f"an integer >= {low}"
            elif low is None:
                bound = f"an integer <= {high}"
            else:
                bound = f"an integer from {low} to {high}"
            raise argparse.ArgumentTypeError(f"{flag} must be {bound}, got {text}")
        return value

    return convert


def float_range(
    flag: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    cap: float | None = None,
) -> Callable[[str], float]:
    """A finite number in [low, high], or in (low, high] with `low_open` (None: no bound).

    `cap` is an upper bound said on its own (`--temperature must be <= 5, got 9`): the message for
    the other bounds stays the one the flag had before it was capped.
    """

    def convert(text: str) -> float:
        value = _parse_float(flag, text)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and value > high
        if not math.isfinite(value) or too_low or too_high:
            if low is None and high is None:
                bound = "a finite number"
            elif high is None:
                bound = f"{'>' if low_open else '>='} {low:g} and finite"
            elif low is None:
                bound = f"<= {high:g} and finite"
            else:
                bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{flag} must be {bound}, got {text}")
        if cap is not None and value > cap:
            raise argparse.ArgumentTypeError(f"{flag} must be <= {cap:g}, got {text}")
        return value

    return convert


def one_of(flag: str, values: Sequence[int]) -> Callable[[str], int]:
    """An integer from a fixed set (e.g. the group sizes the quantization schemes support)."""

    def convert(text: str) -> int:
        value = _parse_int(flag, text)
        if value not in values:
            allowed = ", ".join(map(str, values))
            raise argparse.ArgumentTypeError(f"{flag} must be one of {allowed}, got {text}")
        return value

    return convert
