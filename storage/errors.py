"""Errors that say which file is wrong and what to do; each subclasses the built-in a caller would catch."""

from __future__ import annotations


class SnapshotError(Exception):
    """Base of every storage error, for callers that want to catch them all."""


class SnapshotNotFoundError(SnapshotError, FileNotFoundError):
    """No level holds a complete snapshot; ``checked`` lists every place looked at and why it was passed over."""

    def __init__(self, base: str, checked: list[str]):
        self.checked = checked
        lines = "\n  - ".join(checked)
        super().__init__(f"No snapshot found for {base}: checked\n  - {lines}")


class TornSnapshotError(SnapshotError, ValueError):
    """A snapshot that is incomplete or corrupt: missing/truncated part, gap, size or checksum mismatch."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")

    @classmethod
    def checksum(cls, path: str, got: str, expected: str) -> TornSnapshotError:
        """A file whose checksum is not its manifest's."""
        return cls(path, f"xxh3_128 {got} does not match the manifest's {expected} (corrupt or replaced): publish the "
                   "version again")


class IncompatibleTargetError(SnapshotError, ValueError):
    """The snapshot's names, shapes or dtypes do not fit the parameters it was asked to load into."""


class UnsafeCheckpointError(SnapshotError, ValueError):
    """A pickle Baton will not read: it names a callable outside the tensor allow-list, or is malformed or built
    to crash, hang or exhaust the reader (see ``pickle_safe``). Nothing in it was executed."""


class SnapshotExistsError(SnapshotError, FileExistsError):
    """Publishing an id that already exists without ``overwrite=True``."""


class PartialApplyError(SnapshotError, RuntimeError):
    """Applying failed after live bytes changed (storage died, or a part changed under the reader).

    Under ``verify="stream"`` (the default) a part's checksum is known only once it is read, so a corrupt part
    ends here; under ``"full"`` only storage misbehaving during the load does. ``applied`` lists every tensor
    touched, the one in progress included (it may hold half old, half new bytes); the target holds a mix of
    versions and the caller must restore it.
    """

    def __init__(self, message: str, applied: list[str]):
        self.applied = list(applied)
        names = ", ".join(repr(n) for n in applied[:5]) + (f", … {len(applied) - 5} more" if len(applied) > 5 else "")
        super().__init__(f"{message} (after {len(applied)} tensors were touched: {names}; the target is torn, "
                         "restore it)")
