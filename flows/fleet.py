"""Talking to inference servers over HTTP: the flows never import the server, only speak its API.

A server is Baton's own (``kind="baton"``, the default), FastDeploy's or SGLang's; ``flows.kinds`` maps each
kind to its adapter.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, model_validator

Kind = Literal["baton", "fastdeploy", "sglang"]


class Server(BaseModel):
    """One inference server and what its kind needs to take a version.

    - ``baton``: ``rank``, the snapshot rank it loads.
    - ``fastdeploy``: ``model_dir``, its model path, where versions are staged under its file names; ``gpu_ids``,
      the GPU number of each of its workers (worker ``r`` reads ``model_state.tp{r}.{gpu_ids[r]}.part*``);
      ``api``, which HTTP generation to drive (``auto`` tries ``/v1/sleep`` first); ``config``, the
      ``config.json`` of the model it runs (a file or a directory holding one), by default ``model_dir``'s.
    - ``sglang``: ``model_dir``, where versions are exported as Hugging Face directories it can read; ``config``,
      the ``config.json`` of the model it runs, which the exports get too, by default the one in the directory
      the server reports it loaded from.
    """

    model_config = ConfigDict(extra="forbid")

    url: str
    kind: Kind = "baton"
    rank: int = 0
    model_dir: str | None = None
    gpu_ids: list[int] = [0]
    api: Literal["auto", "v1", "legacy"] = "auto"
    config: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> Server:
        self.url = self.url.rstrip("/")
        if self.kind != "baton" and not self.model_dir:
            raise ValueError(f"{self.url}: a {self.kind} server needs model_dir (where Baton puts the versions it "
                             "loads)")
        if not self.gpu_ids or min(self.gpu_ids) < 0:
            raise ValueError(f"{self.url}: gpu_ids must list a GPU number (>= 0) for each rank, got {self.gpu_ids}")
        return self

    @classmethod
    def parse(cls, value: Server | str | dict) -> Server:
        """Accepts ``Server``, a dict or its JSON (``'{"url": ..., "kind": "fastdeploy", ...}'``),
        ``"http://host:port"`` or ``"http://host:port#rank=1"``."""
        if isinstance(value, Server):
            return value
        if isinstance(value, str) and value.lstrip().startswith("{"):
            value = json.loads(value)
        if isinstance(value, dict):
            return cls(**value)
        url, _, frag = value.partition("#rank=")
        if frag and not (frag.isdigit() and len(frag) <= 6):
            shown = frag if len(frag) <= 20 else f"{frag[:20]}… ({len(frag)} characters)"
            raise ValueError(f"{url}: rank {shown!r} in '#rank=' is not a rank number (0, 1, 2...)")
        return cls(url=url, rank=int(frag) if frag else 0)


class Refused(Exception):
    """The server answered and said no (a 4xx): the same request will not succeed if retried."""


class Untouched(Refused):
    """Refused before anything reached the server (the version could not be staged for it, or does not fit the
    model it runs): it still serves what it served, so nothing is rolled back on it."""


class Unreachable(Exception):
    """No usable answer (connection refused, timeout, 5xx): worth retrying."""


@dataclass
class Outcome:
    url: str
    ok: bool
    status: str  # "live", "refused", "unreachable", "aborted", "rolled back", "rollback failed", "kept"
    version: str | None
    message: str
    seconds: float | None = None
    bytes: int | None = None
    touched: bool = True  # False when it was refused before anything reached the server
    prepared: str | None = None  # how it held the version before the commit: "spare", "staged", "checked", ...


@functools.cache
def _http() -> httpx.Client:
    """One pooled client for every call: a new ``httpx`` client (TLS context, pool) costs more than
    a whole request to a server on the same network."""
    return httpx.Client()


def auth_headers(admin_token_env: str | None) -> dict[str, str]:
    token = os.environ.get(admin_token_env) if admin_token_env else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def call(method: str, url: str, *, timeout: float = 30, **kwargs: Any) -> httpx.Response:
    """One HTTP request; no answer at all (refused, reset, timed out) is ``Unreachable``."""
    try:
        return _http().request(method, url, timeout=timeout, **kwargs)
    except httpx.TransportError as exc:
        raise Unreachable(f"{url}: {exc!r}") from exc


def reply_of(r: httpx.Response) -> dict[str, Any]:
    """The JSON object of a reply, or its text as ``message``."""
    try:
        doc = r.json()
    except ValueError:
        return {"message": r.text[:500]}
    return doc if isinstance(doc, dict) else {"message": str(doc)[:500]}


def weights(server: Server, timeout: float = 30) -> dict[str, Any]:
    """``GET /v1/weights`` of a Baton server: what it serves now."""
    r = call("GET", f"{server.url}/v1/weights", timeout=timeout)
    if r.status_code != 200:
        raise Unreachable(f"{server.url}/v1/weights answered {r.status_code}: {r.text[:300]}")
    return r.json()


def update(server: Server, version: str, snapshot_root: str, verify: str = "stream",
           admin_token_env: str | None = None, timeout: float = 1800) -> dict[str, Any]:
    """``POST /v1/update_weights`` of a Baton server; returns its success reply, raises Refused or Unreachable."""
    body = {"version": version, "snapshot_root": snapshot_root, "rank": server.rank, "verify": verify}
    return admin_call(server, "/v1/update_weights", body, admin_token_env, timeout)


def admin_call(server: Server, path: str, body: dict[str, Any], admin_token_env: str | None,
               timeout: float = 1800, busy_retries: bool = True) -> dict[str, Any]:
    """One of a Baton server's weight calls (update, prepare, commit, abort): its success reply, else ``Refused``
    (a 4xx: the same call will not succeed) or ``Unreachable`` (storage or server trouble, or with
    ``busy_retries`` a 409: another try may succeed)."""
    r = call("POST", f"{server.url}{path}", json=body, headers=auth_headers(admin_token_env), timeout=timeout)
    reply = reply_of(r)
    message = f"{server.url} answered {r.status_code}: {reply.get('message', reply)}"
    if r.status_code == 200 and reply.get("success"):
        return reply
    if (r.status_code == 409 and busy_retries) or r.status_code >= 500:
        raise Unreachable(message)
    raise Refused(message)
