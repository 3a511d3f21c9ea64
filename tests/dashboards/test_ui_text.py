"""Device-supplied text on screen: a safe character set, and Markdown shown literally."""

from __future__ import annotations

import pytest

from millrace.dashboards.ui import MAX_DEVICE_TEXT_CHARS, device_text, md_escape


@pytest.mark.parametrize("unit", ["°C", "kW", "m³/h", "µS/cm", "%", "1/min", "kg·m"])
def test_ordinary_units_are_shown_as_they_are(unit: str) -> None:
    assert device_text(unit) == unit


@pytest.mark.security
@pytest.mark.parametrize(
    ("unit", "shown"),
    [
        ("[x](http://e.x)", "?x??http?//e.x?"),
        ("**bold**", "??bold??"),
        (":red[x]", "?red?x?"),
        ("<b>x</b>", "?b?x?/b?"),
        ("kW\u202egnp.exe", "kWgnp.exe"),  # a bidi override is dropped, not shown
        ("a\nb\tc", "abc"),
        ("", None),
        (None, None),
    ],
)
def test_markup_in_units_never_reaches_the_screen(unit: str | None, shown: str | None) -> None:
    assert device_text(unit) == shown


@pytest.mark.security
def test_device_text_is_capped() -> None:
    shown = device_text("x" * 1000)
    assert shown is not None and len(shown) == MAX_DEVICE_TEXT_CHARS


@pytest.mark.security
def test_md_escape_escapes_every_ascii_punctuation_mark() -> None:
    assert md_escape("a_b*c[d](e)") == "a\\_b\\*c\\[d\\]\\(e\\)"
    assert md_escape("°C µS") == "°C µS"
