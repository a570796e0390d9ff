"""Clients sending completions to servers while something else happens (a sync, a fault), counting which weight
version answered each: how the tests and the benchmarks see what a fleet served."""

from __future__ import annotations

import threading
from collections import Counter

import httpx


class Completions:
    """``threads`` clients sending short completions round robin over ``urls`` until the ``with`` block ends.
    ``seen`` counts the replies by ``weight_version`` (and failures as ``"HTTP <status>"``)."""

    def __init__(self, urls: list[str], threads: int | None = None, prompt: str = "The policy"):
        self.urls, self.prompt, self.stop, self.seen = urls, prompt, threading.Event(), Counter()
        count = len(urls) if threads is None else min(threads, len(urls))
        self.threads = [threading.Thread(target=self._run, args=(i, count)) for i in range(count)]
        self._lock = threading.Lock()

    def _run(self, first: int, stride: int) -> None:
        with httpx.Client(timeout=60) as client:
            k = first
            while not self.stop.is_set():
                r = client.post(f"{self.urls[k % len(self.urls)]}/v1/completions",
                                json={"prompt": self.prompt, "max_tokens": 2})
                k += stride
                key = r.json()["weight_version"] if r.status_code == 200 else f"HTTP {r.status_code}"
                with self._lock:
                    self.seen[key] += 1

    def __enter__(self) -> Completions:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
