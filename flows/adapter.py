"""One interface over every kind of inference server a fleet may hold: prepare, commit, abort, roll back.

``sync-weights`` flips a fleet in two phases: every server ``prepare``s the version (ready, not served), and only
when all have does each ``commit`` (serve) it; a failed prepare ``abort``s the rest, a failed commit ``roll_back``s
the others. One adapter per server per sync carries what it learned (``held``, what it staged) through all of
them. By default a prepare stages and a commit loads and confirms; each kind fills in the steps in a file of its
own (``flows.kinds`` maps a server's kind to it):

- Baton's server loads a version from the snapshot root itself and has the two phases as calls of its own: a
  ``double_buffer`` server prepares into its spare copy, so its commit is a pointer flip (``flows.baton``).
- FastDeploy loads whatever files sit in its model directory: the version is staged there first, then loaded
  over HTTP, and Baton records which version it holds, since the server cannot say (``flows.fastdeploy``).
- SGLang loads a Hugging Face directory: the version is exported as one first (``flows.sglang``).
"""

from __future__ import annotations

import time
from typing import Any

from flows.fleet import Refused, Server, Unreachable, Untouched
from storage import SnapshotError


class Adapter:
    """The steps of taking a version, for one server. Subclasses override what their kind needs."""

    restores_itself = True  # a load that fails leaves it serving what it had (Baton's server)
    holds_unserved = "staged"  # how a prepared version waits for its commit, without being served

    def __init__(self, server: Server):
        self.server = server
        self.before: dict[str, Any] | None = None  # what ``read`` found it serving at the start of the sync

    def read(self) -> dict[str, Any] | None:
        """``held``, read once per sync and kept in ``before`` (the rollback target); None when the server is
        empty, cannot say or does not answer (the prepare that follows retries and reports it)."""
        try:
            self.before = self.held()
        except Unreachable:
            self.before = None
        return self.before

    def held(self) -> dict[str, Any] | None:
        """What the server serves now, as a rollback target (``version`` and ``snapshot_root``, or what the kind
        needs to return to it); None when it is empty or cannot say."""
        raise NotImplementedError

    def stage(self, version: str, snapshot_root: str) -> None:
        """Put ``version`` where the server reads it. Nothing it serves changes yet."""

    def load(self, version: str, snapshot_root: str, verify: str, admin_token_env: str | None) -> dict[str, Any]:
        """Make the server load the staged version; returns a reply with at least ``message``."""
        raise NotImplementedError

    def confirm(self, version: str) -> dict[str, Any]:
        """Check the server serves ``version`` now (``Unreachable`` when not); returns what it reports of it."""
        raise NotImplementedError

    def take(self, version: str, snapshot_root: str, verify: str = "stream",
             admin_token_env: str | None = None) -> dict[str, Any]:
        """Stage, load, confirm. A snapshot that cannot be staged, or does not fit the server's model, is
        ``Untouched`` (retrying will not fix it, and the server was not called); storage that fails while staging
        is ``Unreachable`` (it may)."""
        start = time.perf_counter()
        self._stage(version, snapshot_root)
        return self._load_and_confirm(version, snapshot_root, verify, admin_token_env, start)

    def _load_and_confirm(self, version: str, snapshot_root: str, verify: str, admin_token_env: str | None,
                          start: float) -> dict[str, Any]:
        reply = self.load(version, snapshot_root, verify, admin_token_env) | self.confirm(version)
        reply.setdefault("seconds", round(time.perf_counter() - start, 3))
        return reply

    def _stage(self, version: str, snapshot_root: str) -> None:
        """``stage``, its failures sorted for the retry rule."""
        try:
            self.stage(version, snapshot_root)
        except Refused as exc:
            raise Untouched(str(exc)) from exc
        except SnapshotError as exc:
            raise Untouched(f"{self.server.url}: cannot stage {version}: {exc}") from exc
        except OSError as exc:
            raise Unreachable(f"{self.server.url}: staging {version} failed: {exc!r}") from exc

    def prepare(self, version: str, snapshot_root: str, verify: str = "stream",
                admin_token_env: str | None = None) -> dict[str, Any]:
        """Phase one: the server can serve ``version`` at the commit without anything left to check, and serves
        what it served. Errors as ``take``'s staging. Returns a reply with ``message`` and ``held`` (how it waits:
        ``holds_unserved``)."""
        start = time.perf_counter()
        self._stage(version, snapshot_root)
        return {"message": f"{self.server.url}: {version} {self.holds_unserved}", "held": self.holds_unserved,
                "seconds": round(time.perf_counter() - start, 3)}

    def commit(self, version: str, snapshot_root: str, verify: str = "stream",
               admin_token_env: str | None = None) -> dict[str, Any]:
        """Phase two: serve the prepared ``version`` and confirm it."""
        return self._load_and_confirm(version, snapshot_root, verify, admin_token_env, time.perf_counter())

    def abort(self, version: str, admin_token_env: str | None = None) -> None:
        """The fleet will not commit ``version``: drop what ``prepare`` left, nothing served changes."""

    def roll_back(self, previous: dict[str, Any], verify: str, admin_token_env: str | None) -> None:
        """Return the server to ``previous`` (what ``held`` said before the sync)."""
        self.take(previous["version"], previous["snapshot_root"], verify, admin_token_env)
