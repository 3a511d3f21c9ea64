"""Login for every page: OIDC through st.login when `[auth]` is in Streamlit's
secrets, otherwise local accounts from the users file (dashboards.users).

Roles: viewer < operator < admin; acknowledging alerts needs operator. The
logged-in user lives in the session; its role is re-read from the users file
on every run, so removing or demoting an account takes effect at once.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Final, Literal

import streamlit as st
from streamlit.errors import StreamlitSecretNotFoundError

from millrace.dashboards.config import DashboardConfig, Role
from millrace.dashboards.users import UserRecord, authenticate, load_users
from millrace.errors import MillraceError

logger = logging.getLogger(__name__)

SESSION_KEY: Final = "millrace_user"
ACK_ROLES: Final = frozenset({"operator", "admin"})
# Online guessing: at most this many failures per user name per window, then wait.
MAX_FAILURES: Final = 5
FAILURE_WINDOW_SECONDS: Final = 300.0
MAX_TRACKED_NAMES: Final = 10_000

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


class _Throttle:
    """Failed logins per user name in a sliding window, shared by all sessions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, name: str, now: float) -> deque[float]:
        times = self._failures.setdefault(name, deque())
        while times and times[0] <= now - FAILURE_WINDOW_SECONDS:
            times.popleft()
        return times

    def blocked(self, name: str) -> bool:
        with self._lock:
            return len(self._recent(name, time.monotonic())) >= MAX_FAILURES

    def failed(self, name: str) -> None:
        with self._lock:
            if len(self._failures) >= MAX_TRACKED_NAMES:
                self._failures.clear()
            self._recent(name, time.monotonic()).append(time.monotonic())

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)


_THROTTLE: Final = _Throttle()


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


def _oidc_user(config: DashboardConfig) -> AuthUser | None:
    if not st.user.is_logged_in:
        st.session_state.pop(SESSION_KEY, None)
        return None
    name = str(st.user.get("email") or st.user.get("sub") or "").strip()
    if not name:
        return None
    record = users(config.auth.users_file).get(name)
    role: Role = record.role if record else config.auth.oidc_default_role
    user = AuthUser(name=name, role=role, method="oidc")
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
    if _THROTTLE.blocked(name):
        logger.warning("login throttled: user=%s", name)
        st.error("Too many failed sign-ins for this user. Wait a few minutes and try again.")
        return
    record = authenticate(users(config.auth.users_file), name, password)
    if record is None:
        _THROTTLE.failed(name)
        logger.warning("login failed: user=%s", name)
        st.error("Wrong user name or password.")
        return
    _THROTTLE.succeeded(name)
    logger.info("login: user=%s role=%s", record.name, record.role)
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
