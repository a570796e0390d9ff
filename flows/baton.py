"""Baton's own server as a member of the fleet: ``POST /v1/weights/prepare``, ``/commit`` and ``/abort`` are the two
phases, ``POST /v1/update_weights`` loads a version in one step (a rollback), ``GET /v1/weights`` says what it
serves. A ``double_buffer`` server prepares into its spare copy (``held: "spare"``), so its commit is a pointer
flip; an ``in_place`` one only checks at the prepare (``held: "checked"``) and loads at the commit."""

from __future__ import annotations

from typing import Any

from flows import fleet
from flows.adapter import Adapter
from flows.fleet import Unreachable


class Baton(Adapter):
    holds_unserved = "spare"

    def held(self) -> dict[str, Any] | None:
        now = fleet.weights(self.server)
        return now if now.get("version") else None

    def prepare(self, version: str, snapshot_root: str, verify: str = "stream",
                admin_token_env: str | None = None) -> dict[str, Any]:
        body = {"version": version, "snapshot_root": snapshot_root, "rank": self.server.rank, "verify": verify}
        return fleet.admin_call(self.server, "/v1/weights/prepare", body, admin_token_env)

    def commit(self, version: str, snapshot_root: str, verify: str = "stream",
               admin_token_env: str | None = None) -> dict[str, Any]:
        """The commit's reply names the version the server now serves: that is the confirmation."""
        # a 409 here says nothing is prepared for it: another try cannot succeed
        reply = fleet.admin_call(self.server, "/v1/weights/commit", {"version": version}, admin_token_env,
                                 busy_retries=False)
        if reply.get("version") != version:
            raise Unreachable(f"{self.server.url} committed {version} but serves {reply.get('version')!r}")
        return reply

    def abort(self, version: str, admin_token_env: str | None = None) -> None:
        fleet.admin_call(self.server, "/v1/weights/abort", {"version": version}, admin_token_env, timeout=30)

    def load(self, version: str, snapshot_root: str, verify: str, admin_token_env: str | None) -> dict[str, Any]:
        return fleet.update(self.server, version, snapshot_root, verify, admin_token_env)

    def confirm(self, version: str) -> dict[str, Any]:
        now = fleet.weights(self.server)
        if now.get("version") != version:
            raise Unreachable(f"{self.server.url} accepted {version} but serves {now.get('version')!r}")
        return {"digest": now.get("digest")}
