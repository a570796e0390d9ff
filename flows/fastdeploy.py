"""A FastDeploy server (``--dynamic-load-weight``, load strategy ``ipc_snapshot``) as a member of the fleet.

FastDeploy reloads whatever ``model_state.tp{rank}.{gpu}.part*.pdparams`` sit in its model directory, matched by
name against its own inference model and skipping every other name silently, and keeps no version of its own
beyond ``version.yaml``. So a version is staged there first in FastDeploy's inference layout, checked against the
server's ``config.json`` before anything changes (``storage.fastdeploy.export_fastdeploy``), and
``baton-staged.gpu{ids}.json`` beside records what the server holds once it has loaded it.

Two HTTP generations reload the model directory (``docs/features/weight_update.md``,
``fastdeploy/entrypoints/openai/api_server.py``, ``fastdeploy/worker/gpu/model_runner.py``):

- FastDeploy >= 2.6: ``POST /v1/sleep?tags=weight`` (pauses and frees the weights), then ``POST
  /v1/wakeup?tags=weight`` (``reload_model_weights``, which resumes by itself; it does not check that every
  parameter was loaded, which the staging's pre-flight makes unnecessary);
- legacy: ``GET /clear_load_weight``, then ``GET /update_model_weight`` (``finalize_update`` raises if any
  parameter is left empty); each answers 200 when done, 400 while already updating, 403 while clearing, 404 on
  timeout or without dynamic loading.

``api="auto"`` takes the first where ``/v1/sleep`` exists. ``POST /v1/update_weights`` is never used: it is
FastDeploy's rsync/RDMA path (``update_weights_by_rdma``), which does not read the model directory. FastDeploy
cannot report which weights it holds, so ``GET /health`` (200 once the weights are back) confirms, and Baton's
record says which version that is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx

from flows import fleet
from flows.adapter import Adapter
from flows.fleet import Refused, Unreachable
from storage import join, layout, open_fs, read_record, write_json
from storage.errors import TornSnapshotError
from storage.fastdeploy import export_fastdeploy

RETRY_LATER = {400: "already updating", 403: "clearing its weights"}  # the legacy API's busy answers


def stage_record(gpu_ids: Sequence[int]) -> str:
    """The record of what one FastDeploy server's files in a model directory hold: one per set of GPUs, since
    several servers (on different GPUs) may share a model directory."""
    return f"baton-staged.gpu{'-'.join(str(layout.check_rank(g)) for g in gpu_ids)}.json"


def stage_fastdeploy(snapshot_root: str, version: str, model_dir: str, gpu_ids: Sequence[int], *,
                     config: str | None = None, storage_options: dict[str, Any] | None = None) -> dict:
    """``storage.fastdeploy.export_fastdeploy``, recorded: ``stage_record(gpu_ids)`` says ``swapping`` while the
    parts are swapped in (a set interrupted there is never taken for either version), then ``staged``. Returns
    the record."""
    fs, root = open_fs(model_dir)
    path = join(root, stage_record(gpu_ids))
    record = {"version": version, "snapshot_root": snapshot_root, "gpu_ids": list(gpu_ids)}

    def swapping(placed: dict) -> None:
        record.update(placed, state="swapping", staged_at=time.time())
        write_json(fs, path, record)

    export_fastdeploy(snapshot_root, version, model_dir, gpu_ids, config=config, before_swap=swapping,
                      storage_options=storage_options)
    record["state"] = "staged"
    write_json(fs, path, record)
    return record


def mark_live(model_dir: str, gpu_ids: Sequence[int], version: str) -> None:
    """Records that the FastDeploy server on ``gpu_ids`` over ``model_dir`` loaded the staged ``version``."""
    fs, root = open_fs(model_dir)
    name = stage_record(gpu_ids)
    record = read_record(model_dir, name)
    if not record or record.get("version") != version or record.get("state") not in ("staged", "live"):
        raise TornSnapshotError(join(root, name), f"does not record {version} as staged; stage it again")
    write_json(fs, join(root, name), record | {"state": "live", "live_at": time.time()})


class FastDeploy(Adapter):
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
        self.staged = stage_fastdeploy(snapshot_root, version, self.model_dir, self.server.gpu_ids,
                                       config=self.server.config)

    def abort(self, version: str, admin_token_env: str | None = None) -> None:
        """The server still holds what it held, but its model directory holds ``version``: the previous version
        is staged back and recorded live, so a restart or a later sync finds what the server holds. With nothing
        known before, the record keeps saying ``staged``, which no later sync takes for what it serves."""
        previous = self.before
        if self.staged is None or not previous or not previous.get("version"):
            return
        stage_fastdeploy(previous["snapshot_root"], previous["version"], self.model_dir, self.server.gpu_ids,
                         config=self.server.config)
        mark_live(self.model_dir, self.server.gpu_ids, previous["version"])

    def _send(self, method: str, path: str, headers: dict, timeout: float = 1800) -> httpx.Response:
        return fleet.call(method, f"{self.server.url}{path}", headers=headers, timeout=timeout)

    def _check(self, r: httpx.Response, what: str, legacy: bool) -> None:
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
            r = self._send("POST", "/v1/sleep?tags=weight", headers, timeout=600)
            if r.status_code in (404, 405) and api == "auto":
                api = "legacy"
            else:
                self._check(r, "/v1/sleep?tags=weight", legacy=False)
                api = "v1"
        if api == "legacy":
            for path in ("/clear_load_weight", "/update_model_weight"):
                self._check(self._send("GET", path, headers), path, legacy=True)
        else:  # a failed wakeup leaves it asleep: the rollback stages the previous version and wakes it
            self._check(self._send("POST", "/v1/wakeup?tags=weight", headers), "/v1/wakeup?tags=weight", False)
        staged = self.staged or {}
        calls = "/v1/sleep + /v1/wakeup" if api == "v1" else "/clear_load_weight + /update_model_weight"
        return {"message": f"{self.server.url} loaded {version} from {len(staged.get('files', []))} files staged in "
                           f"{self.model_dir} ({calls})", "bytes": staged.get("bytes")}

    def confirm(self, version: str) -> dict[str, Any]:
        r = fleet.call("GET", f"{self.server.url}/health")
        if r.status_code != 200:
            raise Unreachable(f"{self.server.url}/health answered {r.status_code} after loading {version}")
        mark_live(self.model_dir, self.server.gpu_ids, version)
        return {}
