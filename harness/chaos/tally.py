"""Bookkeeping: one scenario's faults and the outcome of every check made after them."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from harness.launch import log

KINDS = ("succeeded", "refused_clean", "harmless", "partial", "bad")


@dataclass
class Tally:
    """One scenario's faults and the outcome of every check made after them; BAD keeps its first examples so the
    report says exactly what went wrong."""

    scenario: str
    faults: int = 0
    counts: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, kind: str, detail: str = "") -> None:
        assert kind in KINDS, kind
        self.counts[kind] += 1
        if kind == "bad" and len(self.bad_examples) < 10:
            self.bad_examples.append(detail)

    def note(self, what: str, n: int = 1) -> None:
        self.notes[what] += n

    @property
    def checks(self) -> int:
        return sum(self.counts.values())

    @property
    def bad(self) -> int:
        return self.counts["bad"]

    def to_json(self) -> dict:
        return {"scenario": self.scenario, "faults": self.faults, "checks": self.checks,
                **{k: self.counts[k] for k in KINDS}, "notes": dict(self.notes.most_common()),
                "bad_examples": self.bad_examples, "seconds": round(self.seconds, 1)}


@contextlib.contextmanager
def timed(tally: Tally) -> Iterator[Tally]:
    """Adds the seconds spent in the block to ``tally`` and logs its counts when the block ends."""
    start = time.perf_counter()
    try:
        yield tally
    finally:
        tally.seconds += time.perf_counter() - start
        log(f"{tally.scenario}: {tally.faults} faults, {dict(tally.counts)}, {tally.seconds:.0f}s")

