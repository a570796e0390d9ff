"""Running the flows on one machine without a Prefect server: the settings for Prefect's temporary local API."""

from __future__ import annotations

import os
from pathlib import Path


def use_temporary_prefect(home: str | Path) -> None:
    """Point Prefect at a temporary local API whose records live in ``home``. Call before Prefect is imported:
    it reads these settings once."""
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)  # no server configured: Prefect starts a temporary local one
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # cold start, 2 busy cores
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the callers print what matters; the UI has more
