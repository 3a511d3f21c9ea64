"""Alerts: what is active, who acknowledged what and when, and the history."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from millrace.cloud.alerts.lifecycle import MAX_COMMENT_CHARS, AlertError
from millrace.dashboards import auth, charts, data, ui
from millrace.dashboards.auth import PermissionDenied

HISTORY_LABELS = ("24 h", "7 d", "30 d")
NOTICE_KEY = "alerts_notice"
ALERT_TIMES = ["data_ts", "raised_at", "cleared_at", "acknowledged_at"]

ctx = ui.page("Alerts", "Active alerts first; acknowledging one records who did it, when and why.")


def _severity_style(value: object) -> str:
    color = charts.SEVERITY_COLORS.get(str(value))
    return f"color: {color}; font-weight: 600" if color else ""


def _table(frame: pd.DataFrame, columns: list[str]) -> None:
    shown = ui.fill_text(
        ui.table_times(frame, ctx.tz, ALERT_TIMES), ["acknowledged_by", "ack_comment"]
    )
    st.dataframe(
        shown[columns].style.map(_severity_style, subset=["severity"]),
        hide_index=True,
        column_config={
            "id": st.column_config.NumberColumn("#", format="%d"),
            "severity": "Severity",
            "state": "State",
            "device": "Device",
            "metric": "Metric",
            "rule": "Rule",
            "message": st.column_config.TextColumn("Message", width="large"),
            "value": st.column_config.NumberColumn("Value", format="%.4g"),
            "raised_at": "Raised",
            "cleared_at": "Cleared",
            "acknowledged_at": "Acknowledged",
            "acknowledged_by": "By",
            "ack_comment": "Comment",
        },
    )


@ui.live_fragment(ctx.config.refresh_s)
def active() -> None:
    now = data.refresh_now()
    with ui.database_errors():
        frame = data.active_alerts()
        ui.freshness_line(ctx, now)
        st.subheader(f"Active ({len(frame)})")
        if frame.empty:
            st.success("No active alerts.", icon=":material/check:")
            return
        _table(
            frame,
            [
                "id",
                "severity",
                "device",
                "metric",
                "rule",
                "message",
                "value",
                "raised_at",
                "acknowledged_at",
                "acknowledged_by",
                "ack_comment",
            ],
        )


def _label(row: pd.Series) -> str:
    raised = ui.to_local(pd.Series([row["raised_at"]]), ctx.tz)[0]
    return (
        f"#{row['id']} · {row['severity']} · {row['device']} · {row['metric']} · "
        f"{row['rule']} · {row['state']} since {raised:%Y-%m-%d %H:%M}"
    )


def _linked_index(ids: list[int]) -> int:
    """Where the selection starts: the alert a notification's link names (?alert=ID)."""
    raw = st.query_params.get("alert")
    wanted = int(raw) if raw is not None and raw.isdigit() else None
    return ids.index(wanted) if wanted in ids else 0


def acknowledge_form() -> None:
    st.subheader("Acknowledge")
    if not auth.can_acknowledge(ctx.user):
        st.info(
            f"You are signed in as a {ctx.user.role}: acknowledging alerts needs the "
            "operator or admin role.",
            icon=":material/lock:",
        )
        return
    notice = st.session_state.pop(NOTICE_KEY, None)
    if notice:
        st.success(notice, icon=":material/check:")
    with ui.database_errors():
        queue = data.unacknowledged_alerts()
        if queue.empty:
            st.caption("Every alert has been acknowledged.")
            return
        labels = {int(row["id"]): _label(row) for _, row in queue.iterrows()}
        with st.form("acknowledge", clear_on_submit=True, border=True):
            alert_id = st.selectbox(
                "Alert",
                list(labels),
                index=_linked_index(list(labels)),
                format_func=labels.__getitem__,
                key="ack_alert",
            )
            comment = st.text_area(
                "Comment",
                max_chars=MAX_COMMENT_CHARS,
                placeholder="What was done, or why it needs no action",
                key="ack_comment",
            )
            submitted = st.form_submit_button("Acknowledge", type="primary")
        if submitted and alert_id is not None:
            try:
                data.acknowledge_alert(ctx.user, int(alert_id), comment=comment)
            except PermissionDenied as exc:
                st.error(str(exc))
            except AlertError as exc:
                st.warning(str(exc))
            else:
                # Rerun so the tables above show the acknowledgement; the notice survives it.
                st.session_state[NOTICE_KEY] = f"Alert #{alert_id} acknowledged by {ctx.user.name}."
                st.rerun()


def history() -> None:
    st.subheader("History")
    label, range_s = ui.range_picker("alerts_range", labels=HISTORY_LABELS, default="7 d")
    now = data.refresh_now()
    start, end = ui.window(ctx, now, range_s)
    with ui.database_errors():
        frame = data.alert_history(start=start, end=end)
        if frame.empty:
            ui.empty(f"No alert was raised in the last {label}.")
        else:
            _table(
                frame,
                [
                    "id",
                    "severity",
                    "state",
                    "device",
                    "metric",
                    "rule",
                    "value",
                    "raised_at",
                    "cleared_at",
                    "acknowledged_at",
                    "acknowledged_by",
                    "ack_comment",
                ],
            )
        with st.expander("Audit log (latest 50)"):
            audit = data.audit_entries()
            if audit.empty:
                st.caption("No acknowledgements or other audited actions yet.")
            else:
                st.dataframe(
                    ui.table_times(audit, ctx.tz, ["at"]),
                    hide_index=True,
                    column_config={"at": "When"},
                )


active()
acknowledge_form()
history()
