"""Device: one device's metrics over time, at a resolution chosen from the range."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from millrace.dashboards import charts, data, ui
from millrace.dashboards.resolution import format_seconds, pick_resolution

# "Fit" (the default) spans the device's data: a plant that started two minutes ago opens
# on those two minutes, not on a sliver at the right edge of 6 h; never longer than 6 h.
FIT_LABEL = "Fit"
FIT_MIN_SECONDS = 120
FIT_MAX_SECONDS = ui.RANGES_S["6 h"]
RANGE_LABELS = (FIT_LABEL, "1 h", "6 h", "24 h", "7 d", "30 d", "1 y")
DEFAULT_METRICS_SHOWN = 6

ctx = ui.page(
    "Device",
    "Metrics over time: mean line over the min-max band of each point; events as dashed markers.",
)


def _controls() -> tuple[str, str, int, list[str]]:
    """Device, range and metrics pickers; stops the page when there is nothing to pick."""
    names = data.device_names()
    if not names:
        ui.empty(
            "No devices are registered yet. A device appears after its first data batch "
            "reaches an ingest worker."
        )
        st.stop()
    wanted = st.query_params.get("device")
    top = st.columns([2, 3])
    device = top[0].selectbox(
        "Device", names, index=names.index(wanted) if wanted in names else 0, key="device_name"
    )
    st.query_params["device"] = device
    with top[1]:
        range_label, range_s = ui.range_picker(
            "device_range",
            labels=RANGE_LABELS,
            default=FIT_LABEL,
            help=f"{FIT_LABEL}: from the device's oldest data to now, at most "
            f"{format_seconds(FIT_MAX_SECONDS)}.",
        )
    metrics = data.device_metrics(device=device)
    if metrics.empty:
        ui.empty(
            f"{ui.md_escape(device)} has not delivered any numeric metric yet. Check its "
            "signals with `millrace edge check` and its health on the Fleet page."
        )
        st.stop()
    chosen = st.multiselect(
        "Metrics",
        list(metrics["metric"]),
        default=list(metrics["metric"])[:DEFAULT_METRICS_SHOWN],
        key=f"device_metrics_{device}",
    )
    return device, range_label, range_s, chosen


controls = None
with ui.database_errors():
    controls = _controls()
if controls is None:  # the database did not answer; the message is already shown
    st.stop()


def _events_for_chart(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    shown = ui.localize(frame, ctx.tz, ["ts"])
    shown["shown"] = [
        text if kind == "text" else ("on" if value else "off") if kind == "bool" else f"{value:g}"
        for kind, value, text in zip(shown["kind"], shown["value"], shown["text"], strict=True)
    ]
    return shown


@ui.live_fragment(ctx.config.refresh_s)
def device_charts(device: str, chosen: list[str], range_label: str, range_s: int) -> None:
    now = data.refresh_now()
    with ui.database_errors():
        ui.freshness_line(ctx, now)
        if not chosen:
            ui.empty("Select at least one metric above.")
            return
        info = data.device_metrics(device=device).set_index("metric")
        if range_label == FIT_LABEL:  # re-fitted on every refresh, as the data grows
            shown = info[info.index.isin(chosen)]
            range_s = ui.fit_range_s(
                shown["first_ts"].min() if not shown.empty else None,
                ui.window(ctx, now, 0)[1],
                minimum_s=FIT_MIN_SECONDS,
                maximum_s=FIT_MAX_SECONDS,
            )
            range_label = ui.span_text(range_s)
            st.caption(f"Range fitted to the data: the last **{range_label}**.")
        start, end = ui.window(ctx, now, range_s)
        raw_events = data.device_events(device=device, start=start, end=end)
        events = _events_for_chart(raw_events)
        exported: list[pd.DataFrame] = []
        for metric in chosen:
            if metric not in info.index:
                continue
            row = info.loc[metric]
            stored_unit = row["unit"] if isinstance(row["unit"], str) else None
            unit = ui.device_text(stored_unit)  # device-supplied: safe characters on screen
            resolution = pick_resolution(range_s=range_s, period_s=int(row["period_s"]))
            frame = data.series(
                device=device, metric=metric, resolution=resolution, start=start, end=end
            )
            st.subheader(ui.md_escape(f"{metric} ({unit})" if unit else metric))
            if frame.empty:
                last = pd.Timestamp(row["last_ts"]).tz_convert(ctx.tz)
                ui.empty(
                    f"No {ui.md_escape(metric)} data from {ui.md_escape(device)} in the last "
                    f"{range_label}. The newest "
                    f"stored window is from {last:%Y-%m-%d %H:%M} ({ctx.tz_name}); pick a "
                    "longer range or check the device on the Fleet page."
                )
                continue
            st.caption(
                f"Resolution: **{resolution.label}** · {len(frame)} points · "
                f"{int(frame['count'].sum()):,} readings"
            )
            st.altair_chart(
                charts.band_chart(
                    ui.localize(frame, ctx.tz, ["ts"]),
                    metric=metric,
                    unit=unit,
                    tz_name=ctx.tz_name,
                    events=events,
                    domain=ui.local_domain(ctx, start, end),
                ),
                width="stretch",
            )
            exported.append(
                # The export keeps the stored unit; series_csv neutralises formula cells.
                frame.assign(
                    device=device, metric=metric, unit=stored_unit, resolution=resolution.label
                )
            )
        if exported:
            st.download_button(
                "Download CSV",
                charts.series_csv(exported, ctx.tz),
                file_name=f"{device}_{range_label.replace(' ', '')}_{now:%Y%m%dT%H%M}.csv",
                mime="text/csv",
                icon=":material/download:",
                on_click="ignore",
                help=f"The points shown above; times in {ctx.tz_name} with their UTC offset.",
            )
        with st.expander(f"Events ({len(raw_events)})", expanded=False):
            if raw_events.empty:
                st.caption(
                    f"No state or enum changes from {ui.md_escape(device)} "
                    f"in the last {range_label}."
                )
            else:
                st.dataframe(
                    events[["ts", "metric", "shown"]].assign(
                        ts=events["ts"].dt.strftime(ui.TIME_FORMAT)
                    ),
                    hide_index=True,
                    column_config={
                        "ts": "Time",
                        "metric": "Signal",
                        "shown": "Value",
                    },
                )


device, range_label, range_s, chosen = controls
device_charts(device, chosen, range_label, range_s)
