"""Acknowledging alerts: what the dashboard may change, written to the audit log.

Raising and clearing belong to the engine; an operator only acknowledges. The
two axes are independent (docs/alerts.md, Lifecycle). SQLAlchemy Core over
cloud.schema, so the dashboard calls it on its own `Connection` and
transaction; the statements touch only what the dashboard role may write (the
three acknowledgement columns of `alerts`, and `audit_log` rows).
"""

from __future__ import annotations

import logging
from typing import Final

from sqlalchemy import Connection, func, insert, select, update

from millrace.cloud.schema.core import devices
from millrace.cloud.schema.ops import alerts, audit_log
from millrace.errors import MillraceError

logger = logging.getLogger(__name__)

ACK_ACTION: Final = "alert.acknowledge"
MAX_USER_CHARS: Final = 200
MAX_COMMENT_CHARS: Final = 2000

__all__ = ["ACK_ACTION", "MAX_COMMENT_CHARS", "MAX_USER_CHARS", "AlertError", "acknowledge"]


class AlertError(MillraceError):
    """An alert operation cannot be done as asked (unknown alert, already acknowledged...)."""


def acknowledge(conn: Connection, alert_id: int, *, user: str, comment: str = "") -> None:
    """Acknowledge an alert (active or cleared) and record who did it in the audit log.

    Raises AlertError when the alert does not exist or is already acknowledged.
    Runs in the caller's transaction; the caller commits it.
    """
    if not isinstance(user, str) or not user.strip() or len(user) > MAX_USER_CHARS:
        raise AlertError(f"acknowledge: user must be 1-{MAX_USER_CHARS} characters")
    if len(comment) > MAX_COMMENT_CHARS:
        raise AlertError(f"acknowledge: comment longer than {MAX_COMMENT_CHARS} characters")
    device = (
        select(devices.c.name)
        .where(devices.c.id == alerts.c.device_id)
        .correlate(alerts)
        .scalar_subquery()
    )
    # One statement, so two operators acknowledging at once cannot both succeed.
    row = conn.execute(
        update(alerts)
        .where(alerts.c.id == alert_id, alerts.c.acknowledged_at.is_(None))
        .values(acknowledged_at=func.now(), acknowledged_by=user, ack_comment=comment)
        .returning(alerts.c.rule_name, alerts.c.metric, alerts.c.state, alerts.c.severity, device)
    ).one_or_none()
    if row is None:
        existing = conn.execute(
            select(alerts.c.acknowledged_by, alerts.c.acknowledged_at).where(
                alerts.c.id == alert_id
            )
        ).one_or_none()
        if existing is None:
            raise AlertError(f"alert {alert_id} does not exist")
        raise AlertError(
            f"alert {alert_id} was already acknowledged by {existing[0]} at {existing[1]:%c}"
        )
    rule_name, metric, state, severity, device_name = row
    conn.execute(
        insert(audit_log).values(
            user_name=user,
            action=ACK_ACTION,
            target=f"alert:{alert_id}",
            comment=comment,
            details={
                "rule": rule_name,
                "device": device_name,
                "metric": metric,
                "state": state,
                "severity": severity,
            },
        )
    )
    logger.info("alert acknowledged: id=%s user=%s", alert_id, user)
