"""Talking to inference servers over HTTP: the flows never import the server, only speak its API."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel


class Server(BaseModel):
    """One inference server: its base URL and the rank whose files it loads."""

    url: str
    rank: int = 0

    @classmethod
    def parse(cls, value: Server | str | dict) -> Server:
        """Accepts ``Server``, ``{"url": ..., "rank": ...}``, ``"http://host:port"`` or ``"http://host:port#rank=1"``."""
        if isinstance(value, Server):
            return value
        if isinstance(value, dict):
            return cls(**value)
        url, _, frag = value.partition("#rank=")
        return cls(url=url.rstrip("/"), rank=int(frag) if frag else 0)


class Refused(Exception):
    """The server answered and said no (a 4xx): the same request will not succeed if retried."""


class Unreachable(Exception):
    """No usable answer (connection refused, timeout, 5xx): worth retrying."""


@dataclass
class Outcome:
    url: str
    ok: bool
    status: str  # "live", "refused", "unreachable", "rolled back", "rollback failed", "kept"
    version: str | None
    message: str
    seconds: float | None = None
    bytes: int | None = None


@functools.cache
def _http() -> httpx.Client:
    """One pooled client for every call: a new ``httpx`` client costs ~35 ms here (TLS context, pool), more than
    a whole request to a server on the same network."""
    return httpx.Client()


def _headers(admin_token_env: str | None) -> dict[str, str]:
    token = os.environ.get(admin_token_env) if admin_token_env else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def weights(server: Server, timeout: float = 30) -> dict[str, Any]:
    """``GET /v1/weights``: what the server serves now."""
    try:
        r = _http().get(f"{server.url}/v1/weights", timeout=timeout)
    except httpx.TransportError as exc:
        raise Unreachable(f"{server.url}: {exc!r}") from exc
    if r.status_code != 200:
        raise Unreachable(f"{server.url}/v1/weights answered {r.status_code}: {r.text[:300]}")
    return r.json()


def update(server: Server, version: str, snapshot_root: str, verify: str = "stream",
           admin_token_env: str | None = None, timeout: float = 1800) -> dict[str, Any]:
    """``POST /v1/update_weights``; returns the server's success reply, raises Refused or Unreachable."""
    body = {"version": version, "snapshot_root": snapshot_root, "rank": server.rank, "verify": verify}
    try:
        r = _http().post(f"{server.url}/v1/update_weights", json=body, headers=_headers(admin_token_env),
                       timeout=timeout)
    except httpx.TransportError as exc:
        raise Unreachable(f"{server.url}: {exc!r}") from exc
    try:
        reply = r.json()
    except ValueError:
        reply = {"message": r.text[:500]}
    message = f"{server.url} answered {r.status_code}: {reply.get('message', reply)}"
    if r.status_code == 200 and reply.get("success"):
        return reply
    if r.status_code in (409,) or r.status_code >= 500:
        raise Unreachable(message)  # busy, or storage/server trouble: another try may succeed
    raise Refused(message)
