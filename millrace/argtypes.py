"""argparse `type=` checks for numbers, so `--mqtt-wait -1` is a usage error (exit 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number_in(low: float, high: float) -> Callable[[str], float]:
    """A finite number in [low, high], as float."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside [{low:g}, {high:g}]")
        return value

    return parse
