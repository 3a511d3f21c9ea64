"""Pipeline: how fast data flows from devices into the database, and what it drops."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pandas as pd
import streamlit as st

from millrace.dashboards import charts, data, redundancy, ui

RANGE_LABELS = ("15 min", "1 h", "6 h", "24 h")

ctx = ui.page(
    "Pipeline",
    "Ingest rate, delivery delay, commit latency and refused messages over time; the "
    "database nodes, each gateway's broker and failovers.",
)
range_label, range_s = ui.range_picker("pipeline_range", labels=RANGE_LABELS, default="1 h")


def _series_chart(
    frame: pd.DataFrame, columns: dict[str, str], *, y_title: str, color_title: str, domain: Any
) -> Any:
    """Lines of `columns` (column -> legend label) over `ts`, one colour per column."""
    long = frame.melt(id_vars=["ts"], value_vars=list(columns), var_name="series", value_name="s")
    long["series"] = long["series"].map(columns)
    return charts.lines(
        long,
        y="s",
        y_title=y_title,
        tz_name=ctx.tz_name,
        color="series",
        color_title=color_title,
        domain=domain,
    )


def _database(state: redundancy.DatabaseState) -> None:
    """Which node is primary and how far the other is behind."""
    rows = state.replication
    if state.primary:
        st.markdown(f"**Database primary:** `{state.server}` (the node this dashboard reads)")
    else:
        upstream = rows["address"].iloc[0] if not rows.empty else "unknown"
        st.markdown(
            f"**Database primary:** `{upstream}`; this dashboard reads the standby `{state.server}`"
        )
    if rows.empty:
        st.caption(
            "No standby is streaming: the database has no replica, or it is down "
            "(`patronictl list`)."
            if state.primary
            else "This standby is not streaming from a primary."
        )
        return
    st.dataframe(
        ui.fill_text(rows, ["name", "address", "state", "sync_state"]),
        hide_index=True,
        column_config={
            "role": "Node",
            "name": "Name",
            "address": "Address",
            "state": "State",
            "sync_state": "Sync",
            "replay_lag_s": st.column_config.NumberColumn(
                "Replay lag (s)",
                format="%.3f",
                help="How long ago the standby replayed what the primary had then committed; "
                "empty while idle and caught up.",
            ),
            "lag_bytes": st.column_config.NumberColumn(
                "Lag (bytes)", help="WAL the standby has not replayed yet."
            ),
        },
    )


def _redundancy(range_label: str, start: datetime, end: datetime) -> None:
    """The database nodes, each gateway's broker, and failovers in the range."""
    st.subheader("Redundancy")
    _database(data.database_state())
    brokers = data.gateway_brokers()
    if not brokers.empty:
        counts = brokers.groupby("broker").size()
        st.markdown(
            "**Gateways per broker:** " + ", ".join(f"`{b}` {n}" for b, n in counts.items())
        )
        with st.expander("Which broker each gateway is on"):
            st.dataframe(
                ui.table_times(brokers, ctx.tz, ["since"]),
                hide_index=True,
                column_config={"device": "Device", "broker": "Broker", "since": "Since"},
            )
    moves = data.ops_events_in(start=start, end=end)
    if moves.empty:
        st.caption(f"No failover in the last {range_label}: no gateway moved, same primary.")
        return
    lines = ui.table_times(moves, ctx.tz, ["at"]).assign(
        event=[
            redundancy.describe_event(k, d, f, t)
            for k, d, f, t in zip(
                moves["kind"], moves["device"], moves["from_value"], moves["to_value"], strict=True
            )
        ]
    )
    st.dataframe(
        lines[["at", "event"]],
        hide_index=True,
        column_config={"at": "When", "event": "Failover"},
    )


@ui.live_fragment(ctx.config.refresh_s)
def pipeline(range_label: str, range_s: int) -> None:
    now = data.refresh_now()
    start, end = ui.window(ctx, now, range_s)
    bucket_s = ui.bucket_for(range_s)
    with ui.database_errors():
        ingest = data.ingest_timeline(start=start, end=end, bucket_s=bucket_s)
        latency = data.commit_latency(start=start, end=end, bucket_s=bucket_s)
        dead = data.dead_letter_timeline(start=start, end=end, bucket_s=bucket_s)
        ui.freshness_line(ctx, now)
        st.caption(
            f"Each point covers {bucket_s} s of receive time; the interval in progress is "
            "drawn once it is complete."
        )

        windows = int(ingest["windows"].sum()) if not ingest.empty else 0
        tiles = st.columns(4)
        tiles[0].metric(
            "Windows stored",
            ui.compact_count(windows),
            help=f"Windows committed in the last {range_label}.",
            border=True,
        )
        tiles[1].metric(
            "Average rate",
            ui.rate(windows / range_s),
            help=f"Windows committed per second, averaged over the last {range_label}.",
            border=True,
        )
        worst_latency = latency["latency_p95_s"].max() if not latency.empty else None
        tiles[2].metric(
            "Latency p95",
            "n/a" if worst_latency is None else ui.seconds(worst_latency),
            help="Commit latency, window close on the device to its row being stored: the "
            f"highest 95th percentile of the points drawn below ({range_label}).",
            border=True,
        )
        tiles[3].metric(
            "Dead letters",
            ui.compact_count(int(dead["count"].sum()) if not dead.empty else 0),
            help=f"Messages the ingest refused in the last {range_label} (reasons below).",
            border=True,
        )
        _redundancy(range_label, start, end)

        if ingest.empty:
            ui.empty(
                f"Nothing was committed in the last {range_label}: no device delivered data, or "
                "no ingest worker is running (`millrace status`)."
            )
            return
        filled = ui.complete_buckets(
            ingest, start=start, now=now, bucket_s=bucket_s, counts=("batches", "windows", "events")
        )
        domain = ui.local_domain(ctx, start, end)
        local = ui.localize(filled, ctx.tz, ["ts"])
        local["windows_per_s"] = local["windows"] / bucket_s
        local["batches_per_s"] = local["batches"] / bucket_s
        left, right = st.columns(2)
        with left:
            st.subheader("Ingest rate")
            st.altair_chart(
                _series_chart(
                    local,
                    {"windows_per_s": "windows/s", "batches_per_s": "batches/s"},
                    y_title="per second",
                    color_title="Rate",
                    domain=domain,
                ),
                width="stretch",
            )
        with right:
            st.subheader("Delivery delay (sent → received)")
            st.altair_chart(
                _series_chart(
                    local,
                    {"delay_p50_s": "p50", "delay_p95_s": "p95"},
                    y_title="seconds",
                    color_title="Percentile",
                    domain=domain,
                ),
                width="stretch",
            )
            st.caption("Includes outbox backlog after outages and any device clock skew.")
        left, right = st.columns(2)
        with left:
            st.subheader("Commit latency (window close → stored)")
            if latency.empty:
                ui.empty(f"No windows start in the last {range_label}.")
            else:
                st.altair_chart(
                    _series_chart(
                        ui.localize(latency, ctx.tz, ["ts"]),
                        {"latency_p50_s": "p50", "latency_p95_s": "p95"},
                        y_title="seconds",
                        color_title="Percentile",
                        domain=domain,
                    ),
                    width="stretch",
                )
                st.caption("By window start time; a backfill after an outage shows as a spike.")
        with right:
            st.subheader("Dead letters")
            if dead.empty:
                st.success(
                    f"No message was refused in the last {range_label}.", icon=":material/check:"
                )
            else:
                st.altair_chart(
                    charts.stacked_bars(
                        ui.localize(dead, ctx.tz, ["ts"]),
                        y="count",
                        y_title="messages",
                        tz_name=ctx.tz_name,
                        color="code",
                        color_title="Reason",
                        domain=domain,
                    ),
                    width="stretch",
                )


pipeline(range_label, range_s)
