"""Fleet: every device with its status, backlog, losses and certificate life."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from millrace.dashboards import charts, data, ui

# A certificate this close to expiry needs renewing now (the edge warns at the same mark).
CERT_WARN_DAYS = 30

SORTS = {
    "Device": ("device", True),
    "Status (worst first)": ("status_rank", True),
    "Last seen (oldest first)": ("last_seen_at", True),
    "Outbox backlog (largest first)": ("outbox_batches", False),
    "Dropped batches (most first)": ("dropped_batches", False),
    "Certificate days left (fewest first)": ("cert_days_left", True),
}
STATUS_RANK = {"offline": 0, "stale": 1, "online": 2}

ctx = ui.page("Fleet", "Every device: connection, delivery, backlog, losses and certificate life.")

filters = st.columns([2, 2, 2])
statuses = filters[0].multiselect(
    "Status", list(charts.STATUS_COLORS), default=list(charts.STATUS_COLORS), key="fleet_status"
)
search = filters[1].text_input("Device contains", key="fleet_search", placeholder="e.g. press")
sort_label = filters[2].selectbox("Sort by", list(SORTS), key="fleet_sort")


def _status_style(value: object) -> str:
    color = charts.STATUS_COLORS.get(str(value))
    return f"color: {color}; font-weight: 600" if color else ""


def _cert_style(value: object) -> str:
    if isinstance(value, int | float) and not pd.isna(value) and value < CERT_WARN_DAYS:
        return "color: #c62828; font-weight: 600"
    return ""


def _clock_style(value: object) -> str:
    return "color: #c62828; font-weight: 600" if str(value).startswith("off") else ""


@ui.live_fragment(ctx.config.refresh_s)
def fleet_table(statuses: list[str], search: str, sort_label: str) -> None:
    now = data.refresh_now()
    with ui.database_errors():
        fleet = data.fleet(stale_after_s=ctx.config.stale_after_s)
        ui.freshness_line(ctx, now)
        if fleet.empty:
            ui.empty(
                "No devices are registered yet. A device appears after its first birth message "
                "or data batch reaches an ingest worker."
            )
            return
        shown = fleet[fleet["status"].isin(statuses)]
        if search.strip():
            shown = shown[shown["device"].str.contains(search.strip(), case=False, regex=False)]
        counts = fleet["status"].value_counts()
        st.caption(
            f"{len(shown)} of {len(fleet)} devices shown · "
            + " · ".join(f"{int(counts.get(s, 0))} {s}" for s in charts.STATUS_COLORS)
        )
        if shown.empty:
            ui.empty("No device matches these filters. Clear the search or select more statuses.")
            return
        column, ascending = SORTS[sort_label]
        shown = shown.assign(status_rank=shown["status"].map(STATUS_RANK))
        shown = shown.sort_values([column, "device"], ascending=[ascending, True])
        shown = ui.table_times(shown, ctx.tz, ["last_seen_at", "last_data_at"])
        shown["outbox_oldest_age"] = shown["outbox_oldest_age_s"].map(ui.age)
        shown["clock"] = [
            ui.clock_status(synced, skew)
            for synced, skew in zip(shown["clock_synced"], shown["clock_skew_s"], strict=True)
        ]
        columns = [
            "device",
            "status",
            "last_seen_at",
            "last_data_at",
            "agent_version",
            "outbox_batches",
            "outbox_oldest_age",
            "dropped_batches",
            "rejected_readings",
            "cert_days_left",
            "clock",
        ]
        styled = (
            shown[columns]
            .style.map(_status_style, subset=["status"])
            .map(_cert_style, subset=["cert_days_left"])
            .map(_clock_style, subset=["clock"])
        )
        st.dataframe(
            styled,
            hide_index=True,
            height=min(38 + 35 * len(shown), 720),
            column_config={
                "device": st.column_config.TextColumn("Device", pinned=True),
                "status": "Status",
                "last_seen_at": "Last seen",
                "last_data_at": "Last data",
                "agent_version": "Agent",
                "outbox_batches": st.column_config.NumberColumn(
                    "Outbox", help="Batches waiting on the device to be delivered."
                ),
                "outbox_oldest_age": st.column_config.TextColumn(
                    "Oldest queued", help="Age of the oldest batch in the device's outbox."
                ),
                "dropped_batches": st.column_config.NumberColumn(
                    "Dropped",
                    help="Batches the device dropped because its outbox was full (lost data).",
                    width="small",
                ),
                "rejected_readings": st.column_config.NumberColumn(
                    "Rejected", help="Readings the device refused as invalid."
                ),
                "cert_days_left": st.column_config.NumberColumn(
                    "Cert. days", format="%.0f", help="Days until the client certificate expires."
                ),
                "clock": st.column_config.TextColumn("Clock", help=ui.CLOCK_HELP),
            },
        )
        st.caption(
            "Outbox, drops, rejects, certificate and clock come from each device's latest "
            "heartbeat; empty cells mean no heartbeat has arrived yet."
        )


fleet_table(statuses, search, sort_label)
