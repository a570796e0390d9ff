"""Flows that a trainer calls between steps: a flow run should cost tens of milliseconds, not a second.

Prefect's flow engine runs a heartbeat thread that sleeps in whole seconds, and a synchronous flow joins it
on exit, so every in-process call of a sync flow ends up to a second later than its work. Heartbeats only feed
zombie-run detection, which needs an automation a team sets up on purpose; so Baton's flows skip them when
called in-process unless ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set. Runs started from a deployment keep
Prefect's behaviour.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prefect import Flow
from prefect.context import SettingsContext, get_settings_context

from flows.local import wait_until_up

_HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


class _Quiet:
    """The current settings without heartbeats, copied once per settings object (a copy is a deep one). Keyed by
    the object itself, so a caller with other settings gets its own copy, never another's."""

    def __init__(self) -> None:
        self.source: Any = None
        self.copy: Any = None

    def of(self, settings: Any) -> Any:
        if self.source is not settings:
            self.source, self.copy = settings, settings.copy_with_update(updates={"flows.heartbeat_frequency": None})
        return self.copy


_quiet = _Quiet()


def without_heartbeat() -> SettingsContext:
    """``prefect.settings.temporary_settings(updates={"flows.heartbeat_frequency": None})``, with the copy kept."""
    context = get_settings_context()
    return SettingsContext(profile=context.profile, settings=_quiet.of(context.settings))


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
