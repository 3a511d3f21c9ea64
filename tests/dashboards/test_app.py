"""The app under Streamlit's AppTest: login gate, roles, acknowledgement, every page.

The app runs its real code against the filled test database; only the browser
is simulated.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import pandas as pd
import psycopg
import pytest
from streamlit.testing.v1 import AppTest

from millrace.dashboards import charts, data, ui
from millrace.dashboards.auth import AuthUser, PermissionDenied
from millrace.dashboards.users import add_user, load_users, save_users
from tests.dashboards.conftest import PASSWORDS, Plant, write_config

APP = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"
VIEWS = ("overview", "fleet", "device", "alerts", "quality", "pipeline")
TIMEOUT_S = 30


def _app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT_S)


def _login(at: AppTest, name: str, password: str | None = None) -> AppTest:
    at.run()
    at.text_input[0].set_value(name)
    at.text_input[1].set_value(password if password is not None else PASSWORDS[name][1])
    at.button[0].click().run()
    return at


def _no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _shows_only_login(at: AppTest) -> None:
    assert [t.label for t in at.text_input] == ["User name", "Password"]
    assert [b.label for b in at.button] == ["Sign in"]
    assert len(at.dataframe) == 0
    assert len(at.metric) == 0
    assert len(at.get("vega_lite_chart")) == 0
    assert len(at.sidebar.children) == 0


@pytest.mark.security
def test_without_login_only_the_login_is_shown(dash_config: Path) -> None:
    at = _app().run()
    _no_errors(at)
    _shows_only_login(at)
    assert [t.value for t in at.title] == ["Millrace test plant"]
    # No other page is registered for a visitor, so none can be switched to.
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("views/alerts.py")


@pytest.mark.security
@pytest.mark.parametrize("view", VIEWS)
def test_a_page_run_directly_renders_nothing_without_login(dash_config: Path, view: str) -> None:
    at = AppTest.from_file(str(APP.parent / "views" / f"{view}.py"), default_timeout=TIMEOUT_S)
    at.run()
    assert not at.exception
    assert len(at.main.children) == 0


@pytest.mark.security
def test_wrong_password_is_refused(dash_config: Path) -> None:
    at = _login(_app(), "otto", "not-the-password")
    assert [e.value for e in at.error] == ["Wrong user name or password."]
    assert [t.label for t in at.text_input] == ["User name", "Password"]
    assert len(at.dataframe) == 0
    at = _login(_app(), "nobody", "whatever-pw")
    assert [e.value for e in at.error] == ["Wrong user name or password."]


@pytest.mark.security
def test_repeated_failures_lock_the_name_for_a_while(
    tmp_path: Path, plant: Plant, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "users.toml"
    add_user(users, "tess", role="operator", password="tess-right-pw")
    config = write_config(tmp_path, dsn=plant.dash_dsn, users=users)
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))
    for _ in range(5):
        assert _login(_app(), "tess", "wrong-guess").error[0].value.startswith("Wrong")
    at = _login(_app(), "tess", "tess-right-pw")
    assert at.error[0].value.startswith("Too many failed sign-ins")
    assert len(at.dataframe) == 0


@pytest.mark.integration
@pytest.mark.parametrize("name", ["vera", "otto", "ada"])
def test_every_page_renders_for_every_role(dash_config: Path, name: str) -> None:
    at = _login(_app(), name)
    _no_errors(at)
    assert [t.value for t in at.title] == ["Overview"]
    assert at.metric[0].label == "Devices online"
    assert at.metric[0].value == "2 / 3"
    for view in VIEWS[1:]:
        at.switch_page(f"views/{view}.py").run()
        _no_errors(at)
        assert len(at.title) == 1
        assert any("Europe/Berlin" in c.value for c in at.caption)
    assert at.sidebar.button[0].label == "Log out"


@pytest.mark.integration
def test_device_page_labels_resolution_and_exports_csv(dash_config: Path) -> None:
    at = _login(_app(), "vera")
    at.switch_page("views/device.py").run()
    _no_errors(at)
    # The default fits the plant's three hours: raw windows (1080 points of 10 s).
    assert any("Resolution: **10 s windows (raw)**" in c.value for c in at.caption)
    at.segmented_control(key="device_range").set_value("6 h").run()
    captions = [c.value for c in at.caption]
    assert any("Resolution: **30 s buckets of 10 s windows**" in c for c in captions)
    assert any("Resolution: **1 min windows (raw)**" in c for c in captions)
    at.segmented_control(key="device_range").set_value("1 h").run()
    assert any("Resolution: **10 s windows (raw)**" in c.value for c in at.caption)
    assert at.get("download_button")[0].proto.label == "Download CSV"


@pytest.mark.integration
def test_metric_cards_labels_fit_and_explain_themselves(dash_config: Path) -> None:
    """Labels and values short enough not to be cut off ("9.8 windo..."), details in help."""
    at = _login(_app(), "vera")
    cards: list[tuple[str, str, str]] = []
    for view in VIEWS:
        if view != "overview":
            at.switch_page(f"views/{view}.py").run()
        _no_errors(at)
        cards += [(view, m.label, m.value) for m in at.metric]
        for metric in at.metric:
            assert metric.help, (view, metric.label)
    assert {view for view, _, _ in cards} == {"overview", "quality", "pipeline"}
    too_long = [
        (view, label, value)
        for view, label, value in cards
        if len(label) > ui.MAX_METRIC_LABEL_CHARS or len(value) > ui.MAX_METRIC_VALUE_CHARS
    ]
    assert not too_long


@pytest.mark.security
def test_viewer_cannot_acknowledge(dash_config: Path, plant: Plant) -> None:
    at = _login(_app(), "vera")
    at.switch_page("views/alerts.py").run()
    _no_errors(at)
    assert "Acknowledge" not in [b.label for b in at.button]
    assert any("acknowledging alerts needs the operator" in i.value for i in at.info)
    # The data layer refuses too, whatever the page shows.
    with psycopg.connect(plant.dsn) as conn:
        row = conn.execute("SELECT id FROM alerts WHERE state = 'active'").fetchone()
    assert row is not None
    with pytest.raises(PermissionDenied):
        data.acknowledge_alert(AuthUser("vera", "viewer", "local"), row[0], comment="sneaky")
    with psycopg.connect(plant.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone() == (0,)
        acked = conn.execute("SELECT acknowledged_by FROM alerts WHERE id = %s", row).fetchone()
        assert acked == (None,)


@pytest.mark.security
def test_operator_acknowledgement_lands_in_database_and_audit_log(
    plant_factory: Callable[..., Plant],
    users_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    private = plant_factory(hours=1.0)
    config = write_config(tmp_path, dsn=private.dash_dsn, users=users_file)
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))
    with psycopg.connect(private.dsn) as conn:
        row = conn.execute("SELECT id FROM alerts WHERE state = 'active'").fetchone()
    assert row is not None
    alert_id = row[0]

    at = _login(_app(), "otto")
    at.switch_page("views/alerts.py").run()
    _no_errors(at)
    at.selectbox(key="ack_alert").set_value(alert_id)
    at.text_area(key="ack_comment").set_value("Cooling valve reopened")
    next(b for b in at.button if b.label == "Acknowledge").click().run()
    _no_errors(at)
    assert any(f"Alert #{alert_id} acknowledged by otto" in s.value for s in at.success)

    with psycopg.connect(private.dsn) as conn:
        alert = conn.execute(
            "SELECT acknowledged_by, ack_comment, acknowledged_at IS NOT NULL FROM alerts"
            " WHERE id = %s",
            (alert_id,),
        ).fetchone()
        audit = conn.execute(
            "SELECT user_name, action, target, comment FROM audit_log ORDER BY id"
        ).fetchall()
    assert alert == ("otto", "Cooling valve reopened", True)
    assert audit == [("otto", "alert.acknowledge", f"alert:{alert_id}", "Cooling valve reopened")]
    # The page shows it at once (the alert caches were cleared).
    active = at.dataframe[0].value
    assert active.set_index("id").loc[alert_id, "acknowledged_by"] == "otto"


@pytest.mark.security
def test_demoting_a_logged_in_user_takes_effect_on_the_next_run(
    tmp_path: Path, plant: Plant, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "users.toml"
    add_user(users, "olga", role="operator", password="olga-operator-pw")
    config = write_config(tmp_path, dsn=plant.dash_dsn, users=users)
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))
    at = _login(_app(), "olga", "olga-operator-pw")
    at.switch_page("views/alerts.py").run()
    assert "Acknowledge" in [b.label for b in at.button]
    add_user(users, "olga", role="viewer", password="olga-operator-pw")
    at.run()
    assert "Acknowledge" not in [b.label for b in at.button]
    users.write_text("", encoding="utf-8")  # account removed: the session ends
    at.run()
    _shows_only_login(at)


SSO = {
    "redirect_uri": "http://localhost:8501/oauth2callback",
    "cookie_secret": "test-cookie-secret",
    "client_id": "millrace",
    "client_secret": "secret",
    "server_metadata_url": "https://idp.example.com/.well-known/openid-configuration",
}


def _sso_app(identity: dict[str, object]) -> AppTest:
    at = _app()
    at.secrets["auth"] = SSO
    at.user = identity
    return at.run()


@pytest.mark.security
def test_single_sign_on_replaces_local_passwords(
    tmp_path: Path, plant: Plant, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "users.toml"
    add_user(users, "ada@example.com", role="admin", password=None)
    config = write_config(
        tmp_path,
        dsn=plant.dash_dsn,
        users=users,
        auth_extra='oidc_allowed_domains = ["example.com"]',
    )
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))
    at = _sso_app({"is_logged_in": False})
    assert [b.label for b in at.button] == ["Sign in with single sign-on"]
    assert len(at.text_input) == 0  # no local password form next to single sign-on

    at = _sso_app({"is_logged_in": True, "email": "ada@example.com", "email_verified": True})
    _no_errors(at)
    assert at.sidebar.markdown[0].value.startswith("**ada\\@example\\.com**")
    assert "admin" in at.sidebar.markdown[0].value

    at = _sso_app({"is_logged_in": True, "email": "someone@example.com", "email_verified": True})
    at.switch_page("views/alerts.py").run()
    assert "Acknowledge" not in [b.label for b in at.button]  # allowed domain: a viewer


def _shows_only_sso_refusal(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert [b.label for b in at.button] == ["Sign in with another account"]
    assert len(at.error) == 1
    assert len(at.dataframe) == 0
    assert len(at.metric) == 0
    assert len(at.sidebar.children) == 0


@pytest.mark.security
@pytest.mark.parametrize(
    "identity",
    [
        # The provider's other customers: verified, but neither listed nor in an allowed domain.
        {"email": "mallory@evil.example", "email_verified": True},
        {"email": "mallory@example.com.evil.example", "email_verified": True},
        # An allowed address the provider has not verified (anyone can type it at sign-up).
        {"email": "someone@example.com"},
        {"email": "someone@example.com", "email_verified": False},
        {"email": "someone@example.com", "email_verified": "false"},
        {"email": "ada@example.com", "email_verified": False},
        {"sub": "no-email-claim", "email_verified": True},
    ],
    ids=[
        "other-domain",
        "suffix-domain",
        "unverified",
        "verified-false",
        "string",
        "listed",
        "sub",
    ],
)
def test_single_sign_on_refuses_unverified_or_unlisted_identities(
    tmp_path: Path, plant: Plant, monkeypatch: pytest.MonkeyPatch, identity: dict[str, object]
) -> None:
    users = tmp_path / "users.toml"
    add_user(users, "ada@example.com", role="admin", password=None)
    config = write_config(
        tmp_path,
        dsn=plant.dash_dsn,
        users=users,
        auth_extra='oidc_allowed_domains = ["example.com"]',
    )
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))
    at = _sso_app({"is_logged_in": True, **identity})
    _shows_only_sso_refusal(at)
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("views/alerts.py")


@pytest.mark.security
def test_single_sign_on_without_an_allow_list_admits_only_the_users_file(
    tmp_path: Path, plant: Plant, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "users.toml"
    add_user(users, "ada@example.com", role="admin", password=None)
    add_user(users, "eve@example.org", role="viewer", password=None)
    config = write_config(
        tmp_path,
        dsn=plant.dash_dsn,
        users=users,
        auth_extra='oidc_allowed_emails = ["Bob@Example.net"]',
    )
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))
    _shows_only_sso_refusal(
        _sso_app({"is_logged_in": True, "email": "carol@example.com", "email_verified": True})
    )
    at = _sso_app({"is_logged_in": True, "email": "bob@example.net", "email_verified": True})
    _no_errors(at)
    assert at.sidebar.markdown[0].value.startswith("**bob\\@example\\.net**")
    # Removing the account ends its single sign-on session at the next run.
    at = _sso_app({"is_logged_in": True, "email": "eve@example.org", "email_verified": True})
    _no_errors(at)
    remaining = load_users(users)
    del remaining["eve@example.org"]
    save_users(users, remaining)
    at.run()
    _shows_only_sso_refusal(at)


def test_database_down_shows_a_message_not_a_traceback(
    tmp_path: Path, users_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    config = write_config(tmp_path, dsn="postgresql://nobody@127.0.0.1:1/none", users=users_file)
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))
    at = _login(_app(), "vera")
    for view in VIEWS:
        if view != "overview":
            at.switch_page(f"views/{view}.py").run()
        assert not at.exception, (view, [e.value for e in at.exception])
        assert any("The database did not answer" in e.value for e in at.error), view
        assert len(at.dataframe) == 0


@pytest.mark.security
def test_device_supplied_units_are_neither_markdown_nor_spreadsheet_formulas(
    plant_factory: Callable[..., Plant],
    users_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    private = plant_factory(hours=1.0)
    hostile = {
        "temperature": '=HYPERLINK("http://e.x","x")',
        "pressure": "[bar](http://e.x) **:red[x]**",
    }
    with psycopg.connect(private.dsn) as conn:
        for metric, unit in hostile.items():
            conn.execute("UPDATE device_units SET unit = %s WHERE metric = %s", (unit, metric))
    config = write_config(tmp_path, dsn=private.dash_dsn, users=users_file)
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))
    exported: list[bytes] = []
    real_csv = charts.series_csv

    def capture(parts: list[pd.DataFrame], tz: ZoneInfo) -> bytes:
        exported.append(real_csv(parts, tz))
        return exported[-1]

    monkeypatch.setattr(charts, "series_csv", capture)
    at = _login(_app(), "vera")
    at.switch_page("views/device.py").run()
    _no_errors(at)
    headings = [h.value for h in at.subheader if "temperature" in h.value or "pressure" in h.value]
    assert headings, [h.value for h in at.subheader]
    for heading in headings:
        # Nothing of the unit is left for Markdown to interpret: no link, no emphasis, no color.
        assert "](" not in heading and "**" not in heading and ":red[" not in heading
        assert "http://e.x" not in heading
    rows = list(csv.DictReader(io.StringIO(exported[-1].decode("utf-8"))))
    units = {row["metric"]: row["unit"] for row in rows}
    assert units["temperature"] == "'" + hostile["temperature"], units
    assert not any(
        cell.startswith(("=", "+", "-", "@", "\t", "\r")) for row in rows for cell in row.values()
    )


def test_a_notification_link_preselects_its_alert_for_acknowledging(
    plant_factory: Callable[..., Plant],
    users_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`<dashboard_url>/alerts?alert=<id>` (the link in webhooks and e-mails)."""
    private = plant_factory(hours=1.0)
    config = write_config(tmp_path, dsn=private.dash_dsn, users=users_file)
    monkeypatch.setenv("MILLRACE_DASH_CONFIG", str(config))
    with psycopg.connect(private.dsn) as conn:
        extra = conn.execute(
            "INSERT INTO alerts (rule_id, rule_name, device_id, metric, severity, state, message)"
            " SELECT rule_id, rule_name, device_id, 'other', severity, 'cleared', 'second'"
            " FROM alerts ORDER BY id LIMIT 1 RETURNING id"
        ).fetchone()
        ids = [r[0] for r in conn.execute("SELECT id FROM alerts WHERE acknowledged_at IS NULL")]
    assert extra is not None and len(ids) >= 2
    for alert_id in ids:
        at = _login(_app(), "otto")
        at.query_params["alert"] = str(alert_id)
        at.switch_page("views/alerts.py").run()
        _no_errors(at)
        assert at.selectbox(key="ack_alert").value == alert_id
    at.query_params["alert"] = "not-a-number"
    at.run()
    _no_errors(at)
