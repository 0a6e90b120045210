"""Where the bundled assets (css, logo, sample datasets) are, in a checkout and in an installed wheel.

The repository keeps them in ``assets/`` beside the packages; a wheel ships the same files inside the
package as ``autotuning/assets/`` (pyproject.toml maps one onto the other), because a top-level
``assets`` folder has no place in site-packages. An editable install runs from the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ASSETS", "find_assets", "cache_root"]


_PACKAGE_DIR = Path(__file__).resolve().parent


def find_assets(package_dir: Path = _PACKAGE_DIR) -> Path:
    """``autotuning/assets`` when installed from a wheel, else ``assets/`` beside the package (a checkout)."""
    installed, checkout = package_dir / "assets", package_dir.parent / "assets"
    if installed.is_dir():
        return installed
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"bundled assets not found in {installed} or {checkout}: reinstall autotuning")


ASSETS = find_assets()


def cache_root() -> Path:
    """Where builtin models are cached: $AUTOTUNING_CACHE, else ~/.cache/autotuning."""
    env = os.environ.get("AUTOTUNING_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autotuning"
