"""Overview: is the plant delivering data, and does anything need attention?"""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import streamlit as st

from millrace.dashboards import charts, data, ui

# The rate tile averages over this much receive time: long enough to be steady, short
# enough to show a stall within one refresh or two.
RATE_WINDOW_SECONDS = 300
TIMELINE_SECONDS = 3600

ctx = ui.page("Overview", "Devices, alerts and data flow at a glance.")


def _status_counts(fleet: pd.DataFrame) -> dict[str, int]:
    counts = fleet["status"].value_counts()
    return {status: int(counts.get(status, 0)) for status in charts.STATUS_COLORS}


def _alert_counts(frame: pd.DataFrame) -> tuple[dict[str, int], int]:
    by_severity = {s: 0 for s in charts.SEVERITY_COLORS}
    for row in frame.itertuples():
        by_severity[str(row.severity)] = int(row.active)
    return by_severity, int(frame["unacknowledged"].sum()) if not frame.empty else 0


@ui.live_fragment(ctx.config.refresh_s)
def overview() -> None:
    now = data.refresh_now()
    with ui.database_errors():
        fleet = data.fleet(stale_after_s=ctx.config.stale_after_s)
        alert_counts = data.active_alert_counts()
        rate = data.ingest_rate(start=now - timedelta(seconds=RATE_WINDOW_SECONDS), end=now)
        timeline = data.ingest_timeline(
            start=now - timedelta(seconds=TIMELINE_SECONDS), end=now, bucket_s=60
        )
        ui.freshness_line(ctx, now)
        if fleet.empty:
            ui.empty(
                "No devices are registered yet. A device appears after its first birth message "
                "or data batch reaches an ingest worker: check that the edge agents and "
                "`millrace ingest` are running (`millrace status`)."
            )
            return
        statuses = _status_counts(fleet)
        severities, unacked = _alert_counts(alert_counts)
        newest = fleet["last_data_at"].max()
        freshness_s = ui.since(newest, ui.utc_now())

        tiles = st.columns(4)
        tiles[0].metric(
            "Devices online",
            f"{statuses['online']} / {len(fleet)}",
            help="Online: connected and delivering data. Stale: connected but silent for "
            f"{ctx.config.stale_after_s} s. Offline: disconnected (last will).",
            border=True,
        )
        tiles[0].caption(f"{statuses['stale']} stale · {statuses['offline']} offline")
        tiles[1].metric(
            "Active alerts",
            sum(severities.values()),
            help="Alerts raised and not yet cleared, acknowledged or not (the Alerts page).",
            border=True,
        )
        tiles[1].caption(
            f"{severities['critical']} critical · {severities['warning']} warning · "
            f"{severities['info']} info · {unacked} unacknowledged"
        )
        tiles[2].metric(
            "Ingest rate",
            ui.rate(rate.windows_per_s),
            help=f"Windows committed per second over the last {RATE_WINDOW_SECONDS // 60} min.",
            border=True,
        )
        tiles[2].caption(
            f"windows per second · {rate.batches_per_s:,.2f} batches/s from {rate.devices} devices"
        )
        tiles[3].metric(
            "Data freshness",
            ui.age(freshness_s),
            help="Time since the newest data batch from any device was committed.",
            border=True,
        )
        tiles[3].caption("since the newest committed batch")

        left, right = st.columns([1, 2])
        with left:
            st.subheader("Device status")
            status_frame = pd.DataFrame(
                {"status": list(statuses), "devices": list(statuses.values())}
            )
            st.altair_chart(
                charts.category_bars(
                    status_frame,
                    category="status",
                    value="devices",
                    value_title="devices",
                    colors=charts.STATUS_COLORS,
                ),
                width="stretch",
            )
        with right:
            st.subheader("Windows stored per second, last hour")
            if timeline.empty:
                ui.empty(
                    "Nothing was committed in the last hour: no device delivered data, or no "
                    "ingest worker is running."
                )
            else:
                filled = ui.complete_buckets(
                    timeline,
                    start=now - timedelta(seconds=TIMELINE_SECONDS),
                    now=now,
                    bucket_s=60,
                    counts=("batches", "windows", "events"),
                )
                frame = ui.localize(filled, ctx.tz, ["ts"])
                frame["windows_per_s"] = frame["windows"] / 60
                st.altair_chart(
                    charts.lines(
                        frame,
                        y="windows_per_s",
                        y_title="windows/s",
                        tz_name=ctx.tz_name,
                        domain=ui.local_domain(ctx, now - timedelta(seconds=TIMELINE_SECONDS), now),
                        height=200,
                    ),
                    width="stretch",
                )

        attention = fleet[fleet["status"] != "online"]
        st.subheader("Devices needing attention")
        if attention.empty:
            st.success("Every device is online and delivering data.", icon=":material/check:")
        else:
            shown = ui.table_times(attention, ctx.tz, ["last_seen_at", "last_data_at"])
            st.dataframe(
                shown[["device", "status", "last_seen_at", "last_data_at", "outbox_batches"]],
                hide_index=True,
                column_config={
                    "device": "Device",
                    "status": "Status",
                    "last_seen_at": "Last seen",
                    "last_data_at": "Last data",
                    "outbox_batches": st.column_config.NumberColumn("Outbox (batches)"),
                },
            )


overview()
