"""Is the Hugging Face Hub reachable? Answered fast, so offline machines fail in seconds, not minutes.

Without this, a download attempt on a machine with no route out spends ~30 s in retries before
giving up; the quick TCP probe answers in at most a few seconds and is cached briefly.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlparse

from huggingface_hub import constants

__all__ = ["hub_offline_requested", "hub_reachable"]

_CACHE: dict[str, tuple[float, bool]] = {}
_TTL_S = 60.0


def hub_offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the Hub endpoint does not accept a TCP connection."""
    if hub_offline_requested():
        return False

    parsed = urlparse(constants.ENDPOINT)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    key = f"{host}:{port}"
    cached = _CACHE.get(key)
    if cached and time.monotonic() - cached[0] < _TTL_S:
        return cached[1]
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            ok = True
    except OSError:
        ok = False
    _CACHE[key] = (time.monotonic(), ok)
    return ok
