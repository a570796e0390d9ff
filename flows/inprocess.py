"""Flows that a trainer calls between steps: a flow run should cost tens of milliseconds, not a second.

Prefect's flow engine runs a heartbeat thread that sleeps in whole seconds, and a synchronous flow joins it
on exit, so every in-process call of a sync flow ends up to a second later than its work (measured here:
an empty flow takes 1.1 s with it, 0.1 s without). Heartbeats only feed zombie-run detection, which needs
an automation a team sets up on purpose; so Baton's flows skip them when called in-process unless
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set. Runs started from a deployment keep Prefect's behaviour.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prefect import Flow
from prefect.context import SettingsContext, get_settings_context

from flows.local import wait_until_up

_HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")
_quiet: tuple[Any, Any] = (None, None)  # (settings, the same without heartbeats): a copy costs ~30 ms


def without_heartbeat() -> SettingsContext:
    """``prefect.settings.temporary_settings(updates={"flows.heartbeat_frequency": None})``, with the copy kept."""
    global _quiet
    context = get_settings_context()
    if _quiet[0] is not context.settings:
        _quiet = (context.settings, context.settings.copy_with_update(updates={"flows.heartbeat_frequency": None}))
    return SettingsContext(profile=context.profile, settings=_quiet[1])


class InProcessFlow(Flow):
    """A ``prefect.Flow`` whose direct calls run without the heartbeat thread (see the module docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wait_until_up()  # Baton's temporary Prefect server, when ``flows.local`` started one
        if any(k in os.environ for k in _HEARTBEAT_ENV):
            return super().__call__(*args, **kwargs)
        with without_heartbeat():
            return super().__call__(*args, **kwargs)


def flow(**options: Any) -> Callable[[Callable[..., Any]], InProcessFlow]:
    """``@prefect.flow(**options)`` for Baton's flows."""
    return lambda fn: InProcessFlow(fn, **options)
