"""An SGLang server as a member of the fleet: each version is exported as a Hugging Face directory
(``storage.hfexport.export_hf_dir``) under the server's ``model_dir`` and loaded with ``POST
/update_weights_from_disk``; ``GET /model_info`` confirms (``model_path`` and ``weight_version`` must be the new
ones).

SGLang does not restore itself when a disk load fails (``python/sglang/srt/model_executor/model_runner.py``
``update_weights_from_disk``): it points its model config at the new path before loading, copies the tensors one
by one, and its "rolling back to original weights" re-reads that new path, so the tensors copied before the
failure stay; tensors the new files lack keep their old values, and the new path's ``config.json`` is never read.
So Baton checks before calling: the export's architecture against the ``architectures`` ``/model_info`` reports,
and every tensor's name and shape against the config of the model the server runs (the ``config`` of the
server's entry, else the ``config.json`` of the path it serves); a mismatch is refused with the server untouched.
A load that fails anyway is rolled back by Baton to the export the server held before.

In-flight requests: Baton leaves ``abort_all_requests`` at SGLang's default (false), so the update takes SGLang's
writer lock after the requests under way have finished (``managers/tokenizer_manager.py``): none is cut off and each
reply comes from one version, at the price of waiting for the longest request. A successful update renames
``served_model_name`` to the new path, which clients see in ``/v1/models``.
"""

from __future__ import annotations

import json
from typing import Any

from flows import fleet
from flows.adapter import Adapter
from flows.fleet import Refused, Unreachable
from storage import SnapshotError, join, open_fs, read_record
from storage.families import check_model_fits
from storage.hfexport import EXPORT_RECORD, export_hf_dir, prune_exports
from storage.whole import open_version


class SGLang(Adapter):
    restores_itself = False  # a failed disk load leaves a partial model (see the module's docstring)
    holds_unserved = "exported"  # a directory it has not been told to load

    def __init__(self, server):
        super().__init__(server)
        self.export_root: str = server.model_dir
        self.path: str | None = None  # the export of the version being taken

    def info(self) -> dict[str, Any]:
        r = fleet.call("GET", f"{self.server.url}/model_info")
        if r.status_code == 404:  # SGLang before /model_info
            r = fleet.call("GET", f"{self.server.url}/get_model_info")
        if r.status_code != 200:
            raise Unreachable(f"{self.server.url}/model_info answered {r.status_code}: {r.text[:300]}")
        return fleet.reply_of(r)

    def held(self) -> dict[str, Any] | None:
        info = self.info()
        path = info.get("model_path")
        if not path:
            return None
        record = read_record(path, EXPORT_RECORD) or {}
        return {"version": record.get("version"), "snapshot_root": record.get("snapshot_root"), "model_path": path,
                "architectures": info.get("architectures")}

    def _config(self, held: dict[str, Any] | None) -> tuple[bytes, str]:
        where = self.server.config or (held or {}).get("model_path")
        if not where:
            raise Refused(f"{self.server.url}: no config.json to export with: set the server's config")
        fs, path = open_fs(where)
        if fs.isdir(path):
            path = join(path, "config.json")
        try:
            return fs.cat_file(path), fs.unstrip_protocol(path)
        except FileNotFoundError:
            raise Refused(f"{self.server.url}: {fs.unstrip_protocol(path)} does not exist: set the server's config to "
                          "the config.json of the model it serves") from None

    def stage(self, version: str, snapshot_root: str) -> None:
        if self.before is None:  # not read at the start of this sync (a rollback's own take)
            self.before = self.held()
        raw, url = self._config(self.before)
        try:
            doc = json.loads(raw)
            running = (self.before or {}).get("architectures")
            if running and running != doc.get("architectures"):
                raise Refused(f"{self.server.url} runs {running}, {url} describes {doc.get('architectures')}: set "
                              "the server's config to the config.json of the model it serves")
            reader = open_version(snapshot_root, version)
            check_model_fits(reader.index(), doc, url, f"{snapshot_root} {version}")
        except ValueError as exc:  # not JSON, or a model Baton does not know: the server is not called
            if isinstance(exc, SnapshotError):
                raise
            raise Refused(f"{self.server.url}: {url}: {exc}") from exc
        self.path = export_hf_dir(snapshot_root, version, self.export_root, raw, reader=reader)

    def _load_path(self, path: str, weight_version: str | None, admin_token_env: str | None) -> dict[str, Any]:
        body = {"model_path": path, "load_format": "auto", "abort_all_requests": False}
        if weight_version:
            body["weight_version"] = weight_version
        r = fleet.call("POST", f"{self.server.url}/update_weights_from_disk", json=body,
                       headers=fleet.auth_headers(admin_token_env), timeout=1800)
        reply = fleet.reply_of(r)
        message = f"{self.server.url} answered {r.status_code}: {reply.get('message', reply)}"
        if r.status_code == 200 and reply.get("success"):
            return {"message": message}
        if r.status_code >= 500:
            raise Unreachable(message)
        raise Refused(message)  # it may hold a partial model now: the sync rolls it back

    def load(self, version: str, snapshot_root: str, verify: str, admin_token_env: str | None) -> dict[str, Any]:
        return self._load_path(self.path, version, admin_token_env)

    def _confirm_path(self, path: str, version: str | None) -> dict[str, Any]:
        info = self.info()
        reported = info.get("weight_version")
        if info.get("model_path") != path or (version and reported is not None and reported != version):
            raise Unreachable(f"{self.server.url} accepted {path} but reports model_path {info.get('model_path')!r}"
                              f", weight_version {reported!r}")
        return {}

    def confirm(self, version: str) -> dict[str, Any]:
        self._confirm_path(self.path, version)
        keep = {version, (self.before or {}).get("version")}  # the new one, and what a rollback returns to
        prune_exports(self.export_root, sorted(v for v in keep if v))
        return {}

    def abort(self, version: str, admin_token_env: str | None = None) -> None:
        """The export of ``version`` was never loaded: removed, with any but the one the server serves."""
        served = (self.before or {}).get("version")
        if self.path is not None and served:
            prune_exports(self.export_root, [served])

    def roll_back(self, previous: dict[str, Any], verify: str, admin_token_env: str | None) -> None:
        if previous.get("version") and previous.get("snapshot_root"):
            super().roll_back(previous, verify, admin_token_env)
            return
        self._load_path(previous["model_path"], None, admin_token_env)  # the weights it started with
        self._confirm_path(previous["model_path"], None)
