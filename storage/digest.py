"""The digest of a state: equal digests, equal tensors (names, dtypes, shapes and every byte).

Each tensor is hashed on its own (xxh3_128 of ``name|dtype|shape;`` then its bytes) and the state's digest is
xxh3_128 over those, in name order: a publisher computes it part by part in state-dict order as it writes, and
a server over its live weights, and the two agree. A manifest records its rank's digest; a delta records its
base's too, which is how a loader knows, never assumes, that a target holds the base.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import xxhash


def tensor_digest(name: str, code: str, shape, raw: np.ndarray | bytes | memoryview) -> bytes:
    """One tensor's 16-byte digest; ``raw`` its bytes (little-endian, C order)."""
    h = xxhash.xxh3_128(f"{name}|{code}|{[int(d) for d in shape]};".encode())
    h.update(memoryview(raw).cast("B") if isinstance(raw, np.ndarray) else raw)
    return h.digest()


def combine(tensors: Mapping[str, bytes]) -> str:
    """The state's digest from its tensors' (``tensor_digest``)."""
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        h.update(tensors[name])
    return h.hexdigest()
