"""Shared page furniture: the login guard, headings, time zone, ranges, empty states.

Every page starts with `page()`, which stops the script unless someone is
logged in, so no page can render data on its own even if reached directly.
Every auto-refreshing part is a `live_fragment`, which re-checks the session's
user before each rerun: a fragment rerun does not run the page's script, so
without it an open tab of a deleted account would keep receiving data.
Strings a device supplies (units, names) go through `device_text` and, inside
Markdown, `md_escape`: they are shown as text, never interpreted.
"""

from __future__ import annotations

import functools
import logging
import string
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, ParamSpec
from zoneinfo import ZoneInfo

import pandas as pd
import streamlit as st
from sqlalchemy.exc import SQLAlchemyError

from millrace.dashboards import auth, data
from millrace.dashboards.auth import AuthUser
from millrace.dashboards.config import DashboardConfig

logger = logging.getLogger(__name__)
P = ParamSpec("P")

# Device-supplied text shown on screen: letters, digits, spaces and these symbols only
# (enough for units such as "°C", "m³/h", "µS/cm", "%"); anything else becomes "?".
DEVICE_TEXT_SYMBOLS: Final = frozenset(" %/.,°µ³²·^'+-")
MAX_DEVICE_TEXT_CHARS: Final = 64
_MD_SPECIAL: Final = frozenset(string.punctuation)

# Relative ranges offered on time-based pages, by label.
RANGES_S: Final = {
    "15 min": 900,
    "1 h": 3600,
    "6 h": 6 * 3600,
    "24 h": 86_400,
    "7 d": 7 * 86_400,
    "30 d": 30 * 86_400,
    "1 y": 365 * 86_400,
}
TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
# A device clock further than this from the cloud's shifts its windows visibly on the charts.
CLOCK_OFF_SECONDS: Final = 2.0
CLOCK_HELP: Final = (
    "**NTP**: a time daemon (chrony, systemd-timesyncd, ntpd) disciplines the device's clock, "
    'as `timedatectl` reports it ("System clock synchronized"). '
    "**no NTP**: nothing disciplines it; it agrees with the cloud's clock now, but will drift "
    "(a fresh plant on one host without a time daemon shows this everywhere). "
    f"**off by N s**: at its latest heartbeat the device's clock differed from the cloud's by "
    f"more than {CLOCK_OFF_SECONDS:g} s, so its windows are drawn shifted, NTP or not."
)
# Metric cards: at most five in a row, and what they say must fit a laptop screen (1280 px)
# uncut; longer explanations go in the card's help tooltip (the browser test checks the fit).
MAX_METRIC_LABEL_CHARS: Final = 16
MAX_METRIC_VALUE_CHARS: Final = 8
MISSING: Final = "—"
# Tighter than Streamlit's default padding: a wall screen should show data, not margins.
PAGE_CSS: Final = """
<style>
  [data-testid="stMainBlockContainer"] { padding-top: 3.5rem; padding-bottom: 2rem; }
  [data-testid="stMetricValue"] { font-size: 2.1rem; }
</style>
"""


@dataclass(frozen=True, slots=True)
class PageContext:
    """What every page needs: settings, the user, and the shared 'now'."""

    config: DashboardConfig
    user: AuthUser

    @property
    def tz(self) -> ZoneInfo:
        return self.config.tz

    @property
    def tz_name(self) -> str:
        return self.config.timezone


def page(title: str, purpose: str) -> PageContext:
    """Heading of a page; stops the run unless a user is logged in."""
    user = auth.current_user()
    if user is None:
        st.stop()
    assert user is not None  # st.stop() does not return
    config = data.settings()
    st.html(PAGE_CSS)
    st.title(title)
    st.caption(purpose)
    return PageContext(config=config, user=user)


def live_fragment(run_every_s: int) -> Callable[[Callable[P, None]], Callable[P, None]]:
    """st.fragment(run_every=...) that first re-checks the user; gone or disabled -> login."""

    def wrap(body: Callable[P, None]) -> Callable[P, None]:
        @functools.wraps(body)
        def checked(*args: P.args, **kwargs: P.kwargs) -> None:
            if auth.require_user(data.settings()) is None:
                logger.info("fragment rerun stopped: the session has no valid user")
                st.rerun(scope="app")  # the full run shows the login; nothing renders here
            body(*args, **kwargs)

        fragment: Callable[P, None] = st.fragment(run_every=run_every_s)(checked)
        return fragment

    return wrap


def device_text(value: object, *, max_chars: int = MAX_DEVICE_TEXT_CHARS) -> str | None:
    """A device-supplied string limited to a safe character set for display (None if empty)."""
    if not isinstance(value, str):
        return None
    text = unicodedata.normalize("NFC", value)[:max_chars]
    shown = "".join(
        c if c.isalnum() or c in DEVICE_TEXT_SYMBOLS else "?"
        for c in text
        if unicodedata.category(c)[0] != "C"  # controls, format marks (bidi overrides)
    )
    return shown.strip() or None


def md_escape(text: str) -> str:
    """`text` for a Markdown-rendering element: every ASCII punctuation mark backslash-escaped."""
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in text)


def freshness_line(ctx: PageContext, now: datetime) -> None:
    """Which clock the page shows and how current it is (inside each refreshing fragment)."""
    local = now.astimezone(ctx.tz)
    st.caption(
        f"Times in **{ctx.tz_name}** · data as of {local:%Y-%m-%d %H:%M:%S} · "
        f"refreshes every {ctx.config.refresh_s} s"
    )


def to_local(values: pd.Series, tz: ZoneInfo) -> pd.Series:
    """UTC timestamps as wall-clock times of `tz` (naive, so charts and tables show them as is)."""
    return pd.to_datetime(values, utc=True).dt.tz_convert(tz).dt.tz_localize(None)


def localize(frame: pd.DataFrame, tz: ZoneInfo, columns: Sequence[str]) -> pd.DataFrame:
    """A copy of `frame` with `columns` shown in `tz`."""
    out = frame.copy()
    for column in columns:
        if column in out:
            out[column] = to_local(out[column], tz)
    return out


def table_times(frame: pd.DataFrame, tz: ZoneInfo, columns: Sequence[str]) -> pd.DataFrame:
    """A copy of `frame` with `columns` as readable local times ("—" when missing) for tables."""
    out = frame.copy()
    for column in columns:
        if column in out:
            local = pd.to_datetime(out[column], utc=True).dt.tz_convert(tz)
            out[column] = local.dt.strftime(TIME_FORMAT).fillna(MISSING)
    return out


def fill_text(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Missing text shown as "—" rather than "None"."""
    out = frame.copy()
    for column in columns:
        if column in out:
            out[column] = out[column].astype(object).where(out[column].notna(), MISSING)
    return out


def complete_buckets(
    frame: pd.DataFrame, *, start: datetime, now: datetime, bucket_s: int, counts: Sequence[str]
) -> pd.DataFrame:
    """The whole buckets of a count series between `start` and `now`, empty ones as 0.

    Buckets cut by either edge are left out: a half-filled bucket would draw a
    false drop, and a missing one would hide a real stall.
    """
    step = pd.Timedelta(seconds=bucket_s)
    first = pd.Timestamp(start).ceil(step)
    last = pd.Timestamp(now).floor(step)
    index = pd.date_range(first, last, freq=step, inclusive="left", name="ts")
    filled = frame.set_index("ts").reindex(index)
    filled[list(counts)] = filled[list(counts)].fillna(0)
    return filled.reset_index()


def local_domain(ctx: PageContext, start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """A chart's x range as naive wall-clock times of the configured zone."""
    return (
        start.astimezone(ctx.tz).replace(tzinfo=None),
        end.astimezone(ctx.tz).replace(tzinfo=None),
    )


def empty(message: str) -> None:
    """An empty state that says what is missing and what to check."""
    st.info(message, icon=":material/info:")


@contextmanager
def database_errors() -> Iterator[None]:
    """Turn a database failure into one readable message instead of a traceback."""
    try:
        yield
    except SQLAlchemyError as exc:
        logger.warning("dashboard query failed: %s", exc.__class__.__name__, exc_info=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
        st.error(
            "The database did not answer, so this part of the page is not current. "
            f"It is retried on the next refresh. ({reason})",
            icon=":material/cloud_off:",
        )


def range_picker(
    key: str, *, labels: Sequence[str], default: str, help: str | None = None
) -> tuple[str, int]:
    """A row of relative time ranges; returns the label and its length in seconds.

    A label that is not in RANGES_S (the device page's "Fit") has length 0: the page
    works the range out itself.
    """
    choice = st.segmented_control(
        "Time range", list(labels), default=default, key=key, required=True, help=help
    )
    label = choice if isinstance(choice, str) and choice in labels else default
    return label, RANGES_S.get(label, 0)


def window(ctx: PageContext, now: datetime, range_s: int) -> tuple[datetime, datetime]:
    """The shared, refresh-aligned query range ending at the next refresh boundary.

    Ending one interval after the rounded-down `now` keeps the arguments equal for
    every screen in this interval and still includes what arrived since `now`.
    """
    end = now + timedelta(seconds=ctx.config.refresh_s)
    return end - timedelta(seconds=range_s), end


def fit_range_s(first: datetime | None, end: datetime, *, minimum_s: int, maximum_s: int) -> int:
    """A range ending at `end` that starts at or just before `first` (the oldest data shown),
    kept within [minimum_s, maximum_s]; `maximum_s` when `first` is unknown.

    Rounded up to 10 s under 10 minutes and to whole minutes above, so the range does not
    change with every refresh and still starts at the data.
    """
    if first is None or pd.isna(first):
        return maximum_s
    span_s = max((end - pd.Timestamp(first).to_pydatetime()).total_seconds(), 0.0)
    step = 10 if span_s < 600 else 60
    return int(min(maximum_s, max(minimum_s, -(-span_s // step) * step)))


def span_text(seconds: int) -> str:
    """A range length in words: 2 min 20 s, 45 min, 3 h 1 min, 6 h."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours} h" if hours else "", f"{minutes} min" if minutes else ""]
    parts.append(f"{secs} s" if secs or not (hours or minutes) else "")
    return " ".join(p for p in parts if p)


def bucket_for(range_s: int, *, points: int = 120, minimum_s: int = 60) -> int:
    """A bucket width giving about `points` bars over a range, rounded to a readable size."""
    nice = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21_600, 43_200, 86_400)
    wanted = max(minimum_s, range_s / points)
    return next((n for n in nice if n >= wanted), nice[-1])


def age(seconds: float | None) -> str:
    """How long ago, compactly: 12 s, 5 min, 3 h, 2 d."""
    if seconds is None or pd.isna(seconds):
        return "never"
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


def compact_count(value: float) -> str:
    """A count in at most MAX_METRIC_VALUE_CHARS characters: 12,345 / 123 k / 1.23 M / 4.5 G."""
    value = int(value)
    if abs(value) < 100_000:
        return f"{value:,}"
    for size, suffix in ((10**3, "k"), (10**6, "M")):
        text = f"{value / size:.3g}"
        if "e" not in text and abs(float(text)) < 1000:
            return f"{text} {suffix}"
    return f"{value / 10**9:,.3g} G" if abs(value) < 999.5 * 10**9 else f"{value / 10**9:,.0f} G"


def rate(per_second: float) -> str:
    """A rate as a short card value: 0.7/s, 12.3/s, 1,234/s, 123 k/s."""
    if per_second < 999.95:
        return f"{per_second:,.1f}/s"
    return f"{per_second:,.0f}/s" if per_second < 10_000 else f"{compact_count(per_second)}/s"


def seconds(value: float) -> str:
    """A duration as a short card value: 0.35 s, 12.3 s, then as `age` (5 min, 3.0 h)."""
    if value < 9.995:
        return f"{value:.2f} s"
    return f"{value:.1f} s" if value < 89.95 else age(value)


def clock_status(synced: object, skew_s: object, *, off_after_s: float = CLOCK_OFF_SECONDS) -> str:
    """A device's clock in a word or two, from its latest heartbeat (see CLOCK_HELP).

    The measured offset decides first: a clock that is off misplaces data whatever
    disciplines it. "—" when no heartbeat has arrived.
    """
    if synced is None or pd.isna(synced):  # type: ignore[call-overload]
        return MISSING
    if isinstance(skew_s, int | float) and not pd.isna(skew_s) and abs(skew_s) > off_after_s:
        return f"off by {abs(skew_s):.1f} s"
    return "NTP" if bool(synced) else "no NTP"


def since(ts: datetime | pd.Timestamp | None, now: datetime) -> float | None:
    """Seconds from `ts` to `now`, or None when `ts` is missing."""
    if ts is None or pd.isna(ts):
        return None
    return (now - pd.Timestamp(ts).to_pydatetime()).total_seconds()


def utc_now() -> datetime:
    return datetime.now(UTC)
