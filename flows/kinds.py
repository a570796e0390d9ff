"""Which adapter drives which kind of server: the one module that knows them all, so the base knows none."""

from __future__ import annotations

from flows.adapter import Adapter
from flows.baton import Baton
from flows.fastdeploy import FastDeploy
from flows.fleet import Server
from flows.sglang import SGLang

ADAPTERS: dict[str, type[Adapter]] = {"baton": Baton, "fastdeploy": FastDeploy, "sglang": SGLang}


def adapter_for(server: Server) -> Adapter:
    return ADAPTERS[server.kind](server)
