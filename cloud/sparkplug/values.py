"""Sparkplug B datatypes and metric values: which field carries what, and what millrace keeps.

Numbers (the integer types, Float, Double) are windowed; Boolean, String, Text, UUID and
DateTime become events. The other datatypes (DataSet, Bytes, File, Template, property sets,
arrays) are not stored: their metrics are skipped, named in docs/sparkplug.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from millrace.wire.batch import MAX_EVENT_TEXT_CHARS

# Sparkplug B 3.0 datatype codes (the spec's DataType enum).
INT_BITS: Final = {1: 8, 2: 16, 3: 32, 4: 64}  # Int8..Int64: two's complement in their width
UINT_BITS: Final = {5: 8, 6: 16, 7: 32, 8: 64}
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT, UUID = 9, 10, 11, 12, 13, 14, 15
NAMES: Final = {
    1: "Int8", 2: "Int16", 3: "Int32", 4: "Int64", 5: "UInt8", 6: "UInt16", 7: "UInt32",
    8: "UInt64", 9: "Float", 10: "Double", 11: "Boolean", 12: "String", 13: "DateTime",
    14: "Text", 15: "UUID", 16: "DataSet", 17: "Bytes", 18: "File", 19: "Template",
    20: "PropertySet", 21: "PropertySetList",
}  # fmt: skip
MAX_DATATYPE: Final = 34  # 22..34 are the array types
# The protobuf field that must carry a value of each datatype kept.
VALUE_FIELD: Final = {
    **{code: ("int_value" if bits <= 32 else "long_value") for code, bits in INT_BITS.items()},
    **{code: ("int_value" if bits <= 32 else "long_value") for code, bits in UINT_BITS.items()},
    FLOAT: "float_value",
    DOUBLE: "double_value",
    BOOLEAN: "boolean_value",
    STRING: "string_value",
    TEXT: "string_value",
    UUID: "string_value",
    DATETIME: "long_value",
}
NUMERIC: Final = frozenset((*INT_BITS, *UINT_BITS, FLOAT, DOUBLE))

Kind = Literal["number", "event", "skip"]


class ValueError_(ValueError):
    """A metric value millrace cannot keep; the message names the metric, `code` the kind."""

    def __init__(self, reason: str, *, code: str = "wrong_datatype") -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True, slots=True)
class Value:
    """One metric value: `number` goes to a window, anything else to an event."""

    number: float | None
    other: str | bool | float | None


def kind_of(datatype: int) -> Kind:
    """How millrace keeps a datatype (`skip`: known to Sparkplug, not stored)."""
    if datatype in NUMERIC:
        return "number"
    if datatype in VALUE_FIELD:
        return "event"
    return "skip"


def describe(datatype: int) -> str:
    return NAMES.get(datatype, f"datatype {datatype}")


def read_value(metric: Any, datatype: int, where: str) -> Value | None:
    """The value of a decoded protobuf `metric` of `datatype`; None for a null value.

    Raises `ValueError_` when the value is carried in another field than the datatype's,
    or is out of the datatype's range (wrong datatype).
    """
    if metric.is_null:
        return None
    want = VALUE_FIELD[datatype]
    got = metric.WhichOneof("value")
    if got != want:
        raise ValueError_(f"{where}: a {describe(datatype)} value must be in {want}, got {got}")
    raw = getattr(metric, want)
    if datatype in INT_BITS:
        bits = INT_BITS[datatype]
        if not 0 <= raw < 2**bits:
            raise ValueError_(f"{where}: {raw} does not fit {describe(datatype)}")
        return Value(float(raw - 2**bits if raw >= 2 ** (bits - 1) else raw), None)
    if datatype in UINT_BITS:
        if raw >= 2 ** UINT_BITS[datatype]:
            raise ValueError_(f"{where}: {raw} does not fit {describe(datatype)}")
        return Value(float(raw), None)
    if datatype in (FLOAT, DOUBLE):
        return Value(float(raw), None)  # NaN or infinite: counted rejected in its window
    if datatype == DATETIME:
        return Value(None, float(raw))
    if isinstance(raw, str) and (len(raw) > MAX_EVENT_TEXT_CHARS or not raw.isprintable()):
        raise ValueError_(
            f"{where}: text must be printable and at most {MAX_EVENT_TEXT_CHARS} characters"
            " (what a millrace event holds)",
            code="invalid",
        )
    return Value(None, raw)
