"""Who a browser session is on the Hugging Face Hub: the token typed in its form, or its Space login.

Never this server's own login (``app.py --lend-hf-token`` aside). On a Space with OAuth enabled (``hf_oauth: true``
in the README's front matter) the header shows gradio's "Sign in with Hugging Face" button, and every handler that
reads from the Hub takes a ``gr.OAuthToken | None`` parameter, which gradio fills from that session's login.
Anywhere else gradio *mocks* the login with this machine's stored ``hf auth login`` (meant for debugging a Space
locally), which would hand the server's identity to every visitor: there the button is never built, so gradio
adds no login routes at all (it adds them only for an app that has a LoginButton).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import gradio as gr

__all__ = ["oauth_available", "login_token", "build_login"]

# What gradio's real OAuth routes need (gradio.oauth._add_oauth_routes); a Space with hf_oauth: true sets them.
OAUTH_ENV = ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_SCOPES", "OPENID_PROVIDER_URL")


def oauth_available(env: Mapping[str, str] = os.environ) -> bool:
    """A Space with OAuth enabled, decided as gradio decides it: ``SYSTEM=spaces`` and ``SPACE_ID``
    (gradio.utils.get_space; without them gradio mocks the login), and the OAuth app's variables."""
    on_space = env.get("SYSTEM") == "spaces" and bool(env.get("SPACE_ID"))
    return on_space and all(env.get(name) for name in OAUTH_ENV)


def login_token(login: gr.OAuthToken | None) -> str:
    """The access token of a session's Space login, or "" when it is not signed in."""
    return login.token if login is not None else ""


def build_login(env: Mapping[str, str] = os.environ) -> gr.LoginButton | None:
    """The sign-in button, on a Space with OAuth only (see the module docstring for why nowhere else)."""
    if not oauth_available(env):
        return None
    return gr.LoginButton(elem_id="hf-login")
