"""Baton's own server as a member of the fleet: ``POST /v1/update_weights`` loads a version from the snapshot root,
``GET /v1/weights`` says what it serves."""

from __future__ import annotations

from typing import Any

from flows import fleet
from flows.adapter import Adapter
from flows.fleet import Unreachable


class Baton(Adapter):

    def held(self) -> dict[str, Any] | None:
        now = fleet.weights(self.server)
        return now if now.get("version") else None

    def load(self, version: str, snapshot_root: str, verify: str, admin_token_env: str | None) -> dict[str, Any]:
        return fleet.update(self.server, version, snapshot_root, verify, admin_token_env)

    def confirm(self, version: str) -> dict[str, Any]:
        now = fleet.weights(self.server)
        if now.get("version") != version:
            raise Unreachable(f"{self.server.url} accepted {version} but serves {now.get('version')!r}")
        return {"digest": now.get("digest")}
