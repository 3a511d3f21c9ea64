"""Login for every page: OIDC through st.login when `[auth]` is in Streamlit's
secrets, otherwise local accounts from the users file (dashboards.users).

Roles: viewer < operator < admin; acknowledging alerts needs operator. The
logged-in user lives in the session; it is re-checked against the users file
(or the single sign-on allow-list) on every run, fragment reruns included
(`ui.live_fragment`), so removing or demoting an account takes effect at once.

Password guessing is bounded before any hashing: a login first reserves an
attempt slot for its user name and for its source address (dashboards.throttle),
and scrypt runs only while holding one.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Final, Literal

import streamlit as st
from streamlit.errors import StreamlitSecretNotFoundError

from millrace.dashboards.config import AuthSettings, DashboardConfig, Role
from millrace.dashboards.throttle import LoginThrottle
from millrace.dashboards.users import UserRecord, authenticate, load_users
from millrace.errors import MillraceError

logger = logging.getLogger(__name__)

SESSION_KEY: Final = "millrace_user"
REFUSED_KEY: Final = "millrace_sso_refused"
ACK_ROLES: Final = frozenset({"operator", "admin"})
# The source of a login from loopback (Streamlit reports no address for it).
LOCAL_SOURCE: Final = "local"
MAX_SOURCE_CHARS: Final = 64

Method = Literal["local", "oidc"]


class PermissionDenied(MillraceError):
    """The logged-in user's role does not allow this action."""


@dataclass(frozen=True, slots=True)
class AuthUser:
    """Who is looking at the dashboard, and what they may do."""

    name: str
    role: Role
    method: Method


def can_acknowledge(user: AuthUser | None) -> bool:
    """Operators and admins acknowledge alerts; viewers only look."""
    return user is not None and user.role in ACK_ROLES


def current_user() -> AuthUser | None:
    """The user of this browser session, if logged in."""
    user = st.session_state.get(SESSION_KEY)
    return user if isinstance(user, AuthUser) else None


def oidc_configured() -> bool:
    """True when Streamlit's secrets hold an `[auth]` table (st.login's provider settings)."""
    try:
        return "auth" in st.secrets
    except StreamlitSecretNotFoundError:  # no secrets file at all
        return False


@lru_cache(maxsize=8)
def _users_at(path: str, _mtime_ns: int, _size: int) -> dict[str, UserRecord]:
    return load_users(Path(path))


def users(path: Path) -> dict[str, UserRecord]:
    """The users file, re-read only when it changes."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}
    return _users_at(str(path), stat.st_mtime_ns, stat.st_size)


# Shared by every session of this server process.
_THROTTLE: Final = LoginThrottle()


class LoginOutcome(enum.Enum):
    OK = "ok"
    WRONG = "wrong"
    THROTTLED = "throttled"


def check_login(
    accounts: dict[str, UserRecord], name: str, password: str, *, source: str
) -> tuple[LoginOutcome, UserRecord | None]:
    """Verify a password only after reserving an attempt slot for `name` and `source`."""
    slot = _THROTTLE.reserve(name, source)
    if slot is None:
        return LoginOutcome.THROTTLED, None
    try:
        record = authenticate(accounts, name, password)
    except BaseException:
        slot.failed()
        raise
    if record is None:
        slot.failed()
        return LoginOutcome.WRONG, None
    slot.succeeded()
    return LoginOutcome.OK, record


def client_source(settings: AuthSettings) -> str:
    """Where this session connects from: the proxy's header when configured, else the peer.

    Behind a reverse proxy the peer is the proxy, so without `client_address_header`
    every visitor shares one source and its limit.
    """
    address: str | None = None
    if settings.client_address_header:
        value = st.context.headers.get(settings.client_address_header) or ""
        # X-Forwarded-For lists hops left to right; the proxy appended the last one.
        address = value.split(",")[-1].strip() or None
    else:
        address = st.context.ip_address
    return (address or LOCAL_SOURCE)[:MAX_SOURCE_CHARS]


def require_user(config: DashboardConfig) -> AuthUser | None:
    """The logged-in user, refreshed from the users file; None means show the login."""
    if oidc_configured():
        return _oidc_user(config)
    user = current_user()
    if user is None:
        return None
    record = users(config.auth.users_file).get(user.name)
    if record is None or record.password_hash is None:
        logger.info("session ended: account removed user=%s", user.name)
        st.session_state.pop(SESSION_KEY, None)
        return None
    if record.role != user.role:
        user = replace(user, role=record.role)
        st.session_state[SESSION_KEY] = user
    return user


def oidc_refusal(settings: AuthSettings, claims: Mapping[str, object]) -> str | None:
    """Why an identity may not enter (None when it may): a verified, allowed email only."""
    email = str(claims.get("email") or "").strip().lower()
    if not email:
        return "Your identity provider did not share an email address."
    if claims.get("email_verified") is not True:
        return f"{email} is not verified at your identity provider."
    domain = email.rpartition("@")[2]
    if email in settings.oidc_allowed_emails or domain in settings.oidc_allowed_domains:
        return None
    if _oidc_record(settings, email) is not None:
        return None
    return f"{email} has no access to this dashboard. Ask an administrator to add it."


def _oidc_record(settings: AuthSettings, email: str) -> UserRecord | None:
    accounts = users(settings.users_file)
    return accounts.get(email) or next((r for n, r in accounts.items() if n.lower() == email), None)


def _oidc_user(config: DashboardConfig) -> AuthUser | None:
    if not st.user.is_logged_in:
        st.session_state.pop(SESSION_KEY, None)
        st.session_state.pop(REFUSED_KEY, None)
        return None
    claims = {key: st.user.get(key) for key in ("email", "email_verified")}
    refusal = oidc_refusal(config.auth, claims)
    if refusal is not None:
        if st.session_state.pop(SESSION_KEY, None) is not None or (
            st.session_state.get(REFUSED_KEY) != refusal
        ):
            logger.warning("single sign-on refused: %s", refusal)
        st.session_state[REFUSED_KEY] = refusal
        return None
    st.session_state.pop(REFUSED_KEY, None)
    email = str(claims["email"]).strip().lower()
    record = _oidc_record(config.auth, email)
    role: Role = record.role if record else config.auth.oidc_default_role
    user = AuthUser(name=email, role=role, method="oidc")
    st.session_state[SESSION_KEY] = user
    return user


def login_page(config: DashboardConfig) -> None:
    """The only thing a visitor without a session sees."""
    if oidc_configured():
        st.title(config.title)
        st.subheader("Sign in")
        if importlib.util.find_spec("authlib") is None:
            st.error(
                "Single sign-on is configured but the Authlib package is missing on the "
                "dashboard server: install it (pip install 'Authlib>=1.3.2')."
            )
            return
        refused = st.session_state.get(REFUSED_KEY)
        if isinstance(refused, str):
            st.error(refused)
            st.button("Sign in with another account", type="primary", on_click=st.logout)
            return
        st.write("This dashboard uses your organisation's single sign-on.")
        st.button("Sign in with single sign-on", type="primary", on_click=st.login)
        return
    accounts = users(config.auth.users_file)
    _, middle, _ = st.columns([1, 2, 1])
    with middle:
        st.title(config.title)
        st.subheader("Sign in")
        if not any(r.password_hash for r in accounts.values()):
            st.info(
                "No dashboard accounts exist yet. An administrator creates one with "
                "`millrace dash add-user NAME --role operator --users-file "
                f"{config.auth.users_file}`."
            )
        with st.form("login", border=True):
            name = st.text_input("User name", autocomplete="username")
            password = st.text_input("Password", type="password", autocomplete="current-password")
            submitted = st.form_submit_button("Sign in", type="primary")
        if submitted:
            _try_login(config, name.strip(), password)


def _try_login(config: DashboardConfig, name: str, password: str) -> None:
    if not name or not password:
        st.warning("Enter a user name and a password.")
        return
    source = client_source(config.auth)
    outcome, record = check_login(users(config.auth.users_file), name, password, source=source)
    if outcome is LoginOutcome.THROTTLED:
        logger.warning("login throttled: user=%s source=%s", name, source)
        st.error(
            "Too many failed sign-ins for this user or from this address. "
            "Wait a few minutes and try again."
        )
        return
    if record is None:
        logger.warning("login failed: user=%s source=%s", name, source)
        st.error("Wrong user name or password.")
        return
    logger.info("login: user=%s role=%s source=%s", record.name, record.role, source)
    st.session_state[SESSION_KEY] = AuthUser(name=record.name, role=record.role, method="local")
    st.rerun()


def logout() -> None:
    """End the session (and the OIDC cookie when single sign-on is in use)."""
    user = current_user()
    st.session_state.pop(SESSION_KEY, None)
    if user is not None:
        logger.info("logout: user=%s", user.name)
    if user is not None and user.method == "oidc":
        st.logout()
