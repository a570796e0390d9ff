"""Runs of ``sync-weights`` executed inside the warm ``baton deploy`` process, not in a fresh one per run.

Prefect's runner starts each run of a served deployment in a newly spawned Python process, which spends seconds
importing Prefect and the flows before the run even starts; a weight sync after every trainer step should
not. This runner registers one deployment, asks the API every ``poll`` seconds for its due runs, claims each by
moving it to Pending (as Prefect's runner does, so two runners never take the same run), and runs it on a
thread of this process through Prefect's own engine: the run, its task runs, logs and artifacts show in the UI
as any other. What a run gives up compared with its own process: cancelling it from the UI marks it
cancelled but cannot kill it midway (a sync takes seconds), and a crash of the run takes the process with it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow
from prefect.states import Pending
from prefect.utilities.engine import propose_state_sync

from flows.inprocess import without_heartbeat

log = logging.getLogger("baton.deploy")


class WarmRunner:
    """Serves ``flow`` as deployment ``name`` from this process (see the module docstring)."""

    def __init__(self, flow: Flow, name: str, poll: float, max_runs: int = 4):
        self.flow, self.name, self.poll = flow, name, poll
        self.runs = ThreadPoolExecutor(max_runs, thread_name_prefix=f"baton-{name}")
        self.stopped = threading.Event()
        self.taken: set[Any] = set()

    def start(self) -> threading.Thread:
        deployment_id = self.flow.to_deployment(self.name).apply()
        thread = threading.Thread(target=self._poll, args=(deployment_id,), name=f"baton-poll-{self.name}",
                                  daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopped.set()
        self.runs.shutdown(wait=True)  # runs in progress finish; no new ones are taken

    def _poll(self, deployment_id: Any) -> None:
        with get_client(sync_client=True) as client:
            while not self.stopped.is_set():
                try:
                    due = datetime.now(timezone.utc) + timedelta(seconds=self.poll)
                    for run in client.get_scheduled_flow_runs_for_deployments([deployment_id], scheduled_before=due):
                        if run.id not in self.taken and self._claim(client, run):
                            self.taken.add(run.id)
                            self.runs.submit(self._run, run)
                except Exception:  # noqa: BLE001 - the API may be restarting: keep polling
                    log.exception("polling for runs of %s failed; retrying", self.name)
                self.stopped.wait(self.poll)

    @staticmethod
    def _claim(client: Any, run: Any) -> bool:
        try:
            return propose_state_sync(client, Pending(), flow_run_id=run.id).is_pending()
        except Exception:  # noqa: BLE001 - aborted or taken by another runner
            return False

    def _run(self, run: Any) -> None:
        try:
            with without_heartbeat():
                run_flow(self.flow, flow_run=run, return_type="state")
        except Exception:  # noqa: BLE001 - the engine has recorded the run's final state
            log.exception("run %s of %s failed", run.id, self.name)
        finally:
            self.taken.discard(run.id)  # no longer scheduled: the API will not offer it again
