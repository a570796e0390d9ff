"""A FastDeploy server (``--dynamic-load-weight``, load strategy ``ipc_snapshot``) as a member of the fleet.

FastDeploy loads whatever ``model_state.tp{rank}.{gpu}.part*.pdparams`` sit in its model directory and keeps no
version, so a version is staged there first (``storage.export.stage_fastdeploy``: one set, written beside and
moved in, no stale parts left) and ``baton-staged.gpu{ids}.json`` beside them records what the server holds once it has
loaded them. Two HTTP generations load them:

- legacy: ``GET /clear_load_weight`` (free weights and KV cache), then ``GET /update_model_weight``; each answers
  200 when done, 400 while already updating, 403 while clearing, 404 on timeout or without dynamic loading;
- newer: ``POST /v1/pause``, ``POST /v1/update_weights`` (only while paused), ``POST /v1/resume``.

``api="auto"`` uses the newer one when ``/v1/pause`` exists. Either way ``GET /health`` confirms.
"""

from __future__ import annotations

from typing import Any

import httpx

from storage.export import mark_live, read_record, stage_fastdeploy, stage_record

from flows import fleet
from flows.engines import Engine
from flows.fleet import Refused, Unreachable

RETRY_LATER = {400: "already updating", 403: "clearing its weights"}  # the legacy API's busy answers


class FastDeploy(Engine):
    restores_itself = False  # a failed load may leave it cleared or half-loaded: it is rolled back too

    def __init__(self, server):
        super().__init__(server)
        self.model_dir: str = server.model_dir
        self.staged: dict[str, Any] | None = None

    def held(self) -> dict[str, Any] | None:
        record = read_record(self.model_dir, stage_record(self.server.gpu_ids))
        if not record or record.get("state") != "live":
            return None  # never loaded through Baton, or interrupted since: what it holds is unknown
        return {"version": record.get("version"), "snapshot_root": record.get("snapshot_root")}

    def stage(self, version: str, snapshot_root: str) -> None:
        self.staged = stage_fastdeploy(snapshot_root, version, self.model_dir, self.server.gpu_ids)

    def _send(self, method: str, path: str, headers: dict, timeout: float = 1800, **kwargs) -> httpx.Response:
        return fleet.call(method, f"{self.server.url}{path}", headers=headers, timeout=timeout, **kwargs)

    def _call(self, method: str, path: str, headers: dict, legacy: bool, timeout: float = 1800, **kwargs) -> None:
        self._check(self._send(method, path, headers, timeout, **kwargs), path, legacy)

    def _check(self, r, what: str, legacy: bool) -> None:
        if r.status_code == 200:
            return
        message = f"{self.server.url}{what} answered {r.status_code}: {fleet.reply_of(r).get('message', r.text[:300])}"
        if r.status_code >= 500 or (legacy and r.status_code in RETRY_LATER):
            raise Unreachable(message + (f" ({RETRY_LATER[r.status_code]})" if r.status_code in RETRY_LATER else ""))
        if legacy and r.status_code == 404:
            raise Refused(message + " (timed out, or the server was not started with --dynamic-load-weight)")
        raise Refused(message)

    def load(self, version: str, snapshot_root: str, verify: str, admin_token_env: str | None) -> dict[str, Any]:
        headers = fleet.auth_headers(admin_token_env)
        api = self.server.api
        if api != "legacy":
            r = self._send("POST", "/v1/pause", headers, timeout=600)
            if r.status_code in (404, 405) and api == "auto":
                api = "legacy"
            else:
                self._check(r, "/v1/pause", legacy=False)
                api = "v1"
        if api == "legacy":
            self._call("GET", "/clear_load_weight", headers, legacy=True)
            self._call("GET", "/update_model_weight", headers, legacy=True)
        else:
            # a failed update leaves it paused: resuming could serve a half-loaded model; the rollback resumes it
            self._call("POST", "/v1/update_weights", headers, legacy=False, json={})
            self._call("POST", "/v1/resume", headers, legacy=False, timeout=600)
        staged = self.staged or {}
        return {"message": f"{self.server.url} loaded {version} from {len(staged.get('files', []))} files staged in "
                           f"{self.model_dir} ({api} API)", "bytes": staged.get("bytes")}

    def confirm(self, version: str) -> dict[str, Any]:
        r = fleet.call("GET", f"{self.server.url}/health")
        if r.status_code != 200:
            raise Unreachable(f"{self.server.url}/health answered {r.status_code} after loading {version}")
        mark_live(self.model_dir, self.server.gpu_ids, version)
        return {}
