"""The millrace dashboard: `streamlit run dashboards/app.py` (via `millrace dash`).

`run()` registers the pages with st.navigation only after login; a visitor
without a session gets a navigation holding nothing but the login page, so
no other page can be reached by URL.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import streamlit as st

from millrace.dashboards import auth, data, ui
from millrace.errors import MillraceError

logger = logging.getLogger(__name__)

# Not "pages/": Streamlit auto-discovers a pages/ folder beside the entry script and would
# serve each file as its own page, bypassing the login gate in run().
PAGES_DIR: Final = Path(__file__).parent / "views"
# (file, title, material icon, url path)
PAGES: Final = (
    ("overview.py", "Overview", ":material/dashboard:", "overview"),
    ("fleet.py", "Fleet", ":material/router:", "fleet"),
    ("device.py", "Device", ":material/monitoring:", "device"),
    ("alerts.py", "Alerts", ":material/notifications_active:", "alerts"),
    ("quality.py", "Data quality", ":material/rule:", "quality"),
    ("pipeline.py", "Pipeline", ":material/conveyor_belt:", "pipeline"),
)


def _sidebar(user: auth.AuthUser, timezone: str, refresh_s: int) -> None:
    with st.sidebar:
        # An SSO email is chosen at the identity provider: shown as text, not Markdown.
        st.markdown(f"**{ui.md_escape(user.name)}**  \n{user.role}")
        st.caption(f"Times in {timezone} · refresh {refresh_s} s")
        st.button("Log out", icon=":material/logout:", on_click=auth.logout)


def run() -> None:
    """One script run: configuration, login gate, then the selected page."""
    try:
        config = data.settings()
    except MillraceError as exc:
        st.set_page_config(page_title="millrace dashboard", layout="wide")
        st.error(f"The dashboard is not configured: {exc}")
        st.stop()
        return
    st.set_page_config(page_title=config.title, page_icon=":material/factory:", layout="wide")
    user = auth.require_user(config)
    if user is None:
        # Every page's URL shows the login, so a bookmarked page opens after signing in.
        logins = [
            st.Page(lambda: auth.login_page(config), title="Sign in", url_path=url, default=i == 0)
            for i, (_, _, _, url) in enumerate(PAGES)
        ]
        st.navigation(logins, position="hidden").run()
        return
    pages = [
        st.Page(str(PAGES_DIR / file), title=title, icon=icon, url_path=url, default=i == 0)
        for i, (file, title, icon, url) in enumerate(PAGES)
    ]
    navigation = st.navigation(pages, position="top")
    _sidebar(user, config.timezone, config.refresh_s)
    navigation.run()


if __name__ == "__main__":
    run()
