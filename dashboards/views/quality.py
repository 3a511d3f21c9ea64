"""Data quality: what did not arrive, arrived broken, late, or with a wrong clock."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from millrace.dashboards import charts, data, ui

RANGE_LABELS = ("1 h", "24 h", "7 d", "30 d")

ctx = ui.page(
    "Data quality",
    "Refused messages, missing batches, rejected readings, late deliveries, clocks and backlogs.",
)
range_label, range_s = ui.range_picker("quality_range", labels=RANGE_LABELS, default="24 h")


@ui.live_fragment(ctx.config.refresh_s)
def quality(range_label: str, range_s: int) -> None:
    now = data.refresh_now()
    start, end = ui.window(ctx, now, range_s)
    with ui.database_errors():
        dead = data.dead_letter_counts(start=start, end=end)
        samples = data.dead_letter_samples(start=start, end=end)
        gaps = data.open_sequence_gaps()
        holes = data.data_holes_in(start=start, end=end)
        rejected = data.rejected_readings(start=start, end=end)
        delivery = data.delivery_by_device(
            start=start, end=end, late_after_s=ctx.config.late_after_s
        )
        fleet = data.fleet(stale_after_s=ctx.config.stale_after_s)
        backlog = data.backlog_history(start=start, end=end, bucket_s=ui.bucket_for(range_s))
        ui.freshness_line(ctx, now)

        clocks = fleet[["device", "clock_synced", "clock_skew_s"]].assign(
            clock=[
                ui.clock_status(synced, skew)
                for synced, skew in zip(fleet["clock_synced"], fleet["clock_skew_s"], strict=True)
            ]
        )
        clocks_off = sum(str(c).startswith("off") for c in clocks["clock"])
        without_ntp = int(clocks["clock_synced"].eq(False).sum())
        tiles = st.columns(5)
        tiles[0].metric(
            "Dead letters",
            ui.compact_count(int(dead["count"].sum())),
            help=f"Messages the ingest refused in the last {range_label}, by reason below.",
            border=True,
        )
        tiles[1].metric(
            "Missing batches",
            ui.compact_count(int(gaps["missing"].sum())),
            help="Batches in open sequence gaps: numbered by a device, never received. "
            "A gap closes by itself if its batches arrive late.",
            border=True,
        )
        tiles[2].metric(
            "Invalid readings",
            ui.compact_count(int(rejected["rejected"].sum())),
            help=f"Readings the agents refused as invalid (out of range, NaN) in the last "
            f"{range_label}.",
            border=True,
        )
        tiles[3].metric(
            "Late batches",
            ui.compact_count(int(delivery["late"].sum())),
            help=f"Batches received more than {ctx.config.late_after_s} s after the device "
            f"sent them, in the last {range_label}.",
            border=True,
        )
        tiles[4].metric("Clocks off", clocks_off, help=ui.CLOCK_HELP, border=True)
        tiles[4].caption(f"{without_ntp} of {len(clocks)} without NTP")

        st.subheader("Dead letters by reason")
        if dead.empty:
            st.success(
                f"No message was refused in the last {range_label}.", icon=":material/check:"
            )
        else:
            left, right = st.columns([1, 2])
            with left:
                st.altair_chart(
                    charts.category_bars(
                        dead, category="code", value="count", value_title="messages"
                    ),
                    width="stretch",
                )
            with right:
                st.dataframe(
                    ui.table_times(dead, ctx.tz, ["last_at"]),
                    hide_index=True,
                    column_config={
                        "code": "Reason",
                        "count": st.column_config.NumberColumn("Messages"),
                        "devices": st.column_config.NumberColumn("Devices"),
                        "last_at": "Latest",
                    },
                )
            st.caption("Newest samples per reason (payload preview, text or hex)")
            st.dataframe(
                ui.table_times(samples, ctx.tz, ["received_at"]),
                hide_index=True,
                column_config={
                    "code": "Reason",
                    "received_at": "Received",
                    "device": "Device",
                    "topic": "Topic",
                    "reason": st.column_config.TextColumn("Detail", width="large"),
                    "content_type": "Content type",
                    "payload_bytes": st.column_config.NumberColumn("Bytes"),
                    "payload_head": st.column_config.TextColumn("Payload", width="large"),
                },
            )

        st.subheader("Sequence gaps")
        if gaps.empty:
            st.success(
                "No open gaps: every batch sent since each device started has arrived.",
                icon=":material/check:",
            )
        else:
            st.caption(
                "Batches a device numbered but the cloud never received. A gap closes by itself "
                "if the batch arrives late; one that stays open is lost data."
            )
            st.dataframe(
                ui.table_times(gaps, ctx.tz, ["detected_at"]),
                hide_index=True,
                column_config={
                    "device": "Device",
                    "boot_id": "Boot",
                    "seq_from": st.column_config.NumberColumn("From seq", format="%d"),
                    "seq_to": st.column_config.NumberColumn("To seq", format="%d"),
                    "missing": st.column_config.NumberColumn("Missing batches"),
                    "detected_at": "Detected",
                },
            )

        st.subheader("Lost at unclean ends")
        if holes.empty:
            st.success(
                f"No agent ended uncleanly (power cut, watchdog, kill) in the last {range_label}.",
                icon=":material/check:",
            )
        else:
            st.caption(
                "Windows an agent lost when its run ended without an orderly stop (power cut, "
                "watchdog kill, SIGKILL): from the end of the last window it had stored to "
                "the start of its next run. Its next start reported them."
            )
            st.dataframe(
                ui.table_times(holes, ctx.tz, ["from_ts", "to_ts"]),
                hide_index=True,
                column_config={
                    "device": "Device",
                    "metric": "Metric",
                    "from_ts": "From",
                    "to_ts": "To",
                    "duration_s": st.column_config.NumberColumn("Lost (s)", format="%.1f"),
                    "cause": "Cause",
                    "boot_id": "Ended run",
                    "metrics_omitted": st.column_config.NumberColumn(
                        "Unnamed metrics",
                        help="Metrics of the same hole over the 256 a birth names.",
                    ),
                },
            )

        st.subheader("Rejected readings")
        if rejected.empty:
            st.success(
                f"No device rejected a reading in the last {range_label}.", icon=":material/check:"
            )
        else:
            shown = rejected.assign(
                share=rejected["rejected"] / (rejected["rejected"] + rejected["accepted"])
            )
            st.dataframe(
                shown,
                hide_index=True,
                column_config={
                    "device": "Device",
                    "metric": "Metric",
                    "rejected": st.column_config.NumberColumn("Rejected"),
                    "accepted": st.column_config.NumberColumn("Accepted"),
                    "share": st.column_config.NumberColumn("Rejected share", format="percent"),
                },
            )
            st.caption("Out-of-range, NaN or otherwise invalid values counted by the agents.")

        st.subheader("Late deliveries and clocks")
        merged = clocks.merge(delivery, on="device", how="left")
        if merged.empty:
            ui.empty("No devices are registered yet.")
        else:
            st.dataframe(
                ui.table_times(merged, ctx.tz, ["last_received_at"]).style.map(
                    lambda v: (
                        "color: #c62828; font-weight: 600"
                        if isinstance(v, float) and not pd.isna(v) and abs(v) > ui.CLOCK_OFF_SECONDS
                        else ""
                    ),
                    subset=["clock_skew_s"],
                ),
                hide_index=True,
                column_order=[
                    "device",
                    "clock",
                    "clock_skew_s",
                    "batches",
                    "late",
                    "max_delay_s",
                    "unsynced",
                    "last_received_at",
                ],
                column_config={
                    "device": "Device",
                    "clock": st.column_config.TextColumn("Clock", help=ui.CLOCK_HELP),
                    "clock_skew_s": st.column_config.NumberColumn(
                        "Clock offset (s)",
                        format="%.2f",
                        help="Device clock minus cloud clock at its latest heartbeat "
                        "(positive: the device is ahead; transit adds milliseconds).",
                    ),
                    "batches": st.column_config.NumberColumn(f"Batches, {range_label}"),
                    "late": st.column_config.NumberColumn(
                        "Late", help=f"Received over {ctx.config.late_after_s} s after sending."
                    ),
                    "max_delay_s": st.column_config.NumberColumn("Worst delay (s)", format="%.1f"),
                    "unsynced": st.column_config.NumberColumn(
                        "Sent without NTP",
                        help="Batches the device sent while its clock was not NTP-synchronised.",
                    ),
                    "last_received_at": "Last batch",
                },
            )

        st.subheader("Outbox backlog per device")
        if backlog.empty:
            ui.empty(
                f"No heartbeats in the last {range_label}, so backlog is unknown. Agents report "
                "their outbox in each heartbeat; check that they are running."
            )
        else:
            st.altair_chart(
                charts.lines(
                    ui.localize(backlog, ctx.tz, ["ts"]),
                    y="outbox_batches",
                    y_title="outbox (batches)",
                    tz_name=ctx.tz_name,
                    color="device",
                    color_title="Device",
                    domain=ui.local_domain(ctx, start, end),
                ),
                width="stretch",
            )


quality(range_label, range_s)
