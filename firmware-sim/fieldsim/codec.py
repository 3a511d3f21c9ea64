"""Register encoding of engineering values, as the PLC puts them on the wire."""

from __future__ import annotations

import math
import struct

from millrace.fieldsim.models import mix, stream_key
from millrace.fieldsim.specs import RegisterSignal

# Integer "no value" sentinels served for NaN; real values saturate one short
# of them so a sentinel is never a reading.
_INT_LIMITS: dict[str, tuple[int, int, int]] = {
    # type: (lowest served, highest served, sentinel)
    "int16": (-0x7FFF, 0x7FFF, -0x8000),
    "uint16": (0, 0xFFFE, 0xFFFF),
    "int32": (-0x7FFFFFFF, 0x7FFFFFFF, -0x80000000),
    "uint32": (0, 0xFFFFFFFE, 0xFFFFFFFF),
}
# Guards floor() against values like 0.3 / 0.1 = 2.9999999999999996.
_FLOOR_EPSILON = 1e-9


def _split(raw: int, words: int) -> list[int]:
    raw &= (1 << (16 * words)) - 1
    return [(raw >> (16 * (words - 1 - i))) & 0xFFFF for i in range(words)]


def encode(sig: RegisterSignal, value: float) -> tuple[list[int], float]:
    """Registers (in wire order) for `value`, and the engineering value a correct reader decodes.

    Coils come back as a one-element list of 0 or 1.
    """
    if sig.type == "bool":
        bit = 1 if (not math.isnan(value) and value >= 0.5) else 0
        return [bit], float(bit)
    if sig.type == "float32":
        packed = struct.pack(">f", value / sig.scale if not math.isnan(value) else math.nan)
        high, low = struct.unpack(">HH", packed)
        served = struct.unpack(">f", packed)[0] * sig.scale
        return ([high, low] if sig.word_order == "big" else [low, high]), served
    lowest, highest, sentinel = _INT_LIMITS[sig.type]
    words = sig.words
    if math.isnan(value):
        raw, served = sentinel, math.nan
    else:
        if sig.spec.kind == "counter":
            raw = math.floor(value / sig.scale + _FLOOR_EPSILON) % (1 << (16 * words))
        else:
            raw = max(lowest, min(highest, round(value / sig.scale)))
        served = raw * sig.scale
    registers = _split(raw, words)
    if sig.word_order == "little" and words == 2:
        registers.reverse()
    return registers, served


def garbage(seed: int, device: str, sig: RegisterSignal, step: int) -> list[int]:
    """Deterministic nonsense for the "garbage" fault, one word per register."""
    key = stream_key(seed, device, sig.spec.name, "garbage")
    if sig.type == "bool":
        return [mix(key, step) & 1]
    return [mix(key, step * 4 + i) & 0xFFFF for i in range(sig.words)]
