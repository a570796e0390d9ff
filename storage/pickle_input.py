"""The bytes of a pickle that ``pickle_safe`` interprets, in memory or read from a binary file: every length is
checked against the bytes left before anything is read or allocated, a file is read ahead in chunks, and tensor
bytes are read straight into their own buffer (or, when loading lazily, passed over and left in the file)."""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO, NoReturn

from .pickle_objects import FileSpan

_AHEAD = 1 << 20  # opcodes are read from a file this much at a time
_RAW_STEP = 8 << 20  # tensor bytes are read straight into their buffer this much at a time


class PickleInput:
    """The pickle's bytes (in memory, or a binary file read ahead in chunks), with every length checked
    against what is left before anything is read or allocated. ``fail(why)`` raises the refusal."""

    def __init__(self, data: bytes | BinaryIO, size: int | None, fail: Callable[[str], NoReturn]):
        self.fail = fail
        if isinstance(data, (bytes, bytearray, memoryview)):
            self.file, self.buf = None, memoryview(data).cast("B")
            self.size = len(self.buf)
        else:
            self.file, self.buf = data, memoryview(b"")
            self.origin = data.tell()  # where the pickle starts in the file
            if size is None:
                data.seek(0, 2)
                size = data.tell() - self.origin
                data.seek(self.origin)
            self.size = size
        self.base = 0  # offset in the pickle of buf[0]
        self.at = 0  # index in buf of the next byte

    @property
    def pos(self) -> int:
        return self.base + self.at

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"{what} of {n} bytes at offset {self.pos} runs past the end of the file ({self.size} bytes)")

    def byte(self) -> int:
        at = self.at
        if at >= len(self.buf):  # buf never holds bytes past the end of the file: only then is a check due
            self.need(1, "an opcode")
            self._refill(1)
            at = 0
        self.at = at + 1
        return self.buf[at]

    def take(self, n: int, what: str = "a field") -> memoryview:
        at = self.at
        if at + n > len(self.buf):
            self.need(n, what)
            self._refill(n)
            at = 0
        self.at = at + n
        return self.buf[at:at + n]

    def _refill(self, n: int) -> None:
        """Read ahead from the file so that buf holds at least the next ``n`` bytes (``need`` passed)."""
        parts = [bytes(self.buf[self.at:])]
        have, want = len(parts[0]), min(max(n, _AHEAD), self.size - self.pos)
        while have < want:
            chunk = self.file.read(want - have)
            if not chunk:
                self._short(self.pos + have)
            parts.append(chunk)
            have += len(chunk)
        self.base, self.buf, self.at = self.pos, memoryview(b"".join(parts)), 0

    def payload(self, n: int, what: str) -> memoryview | bytearray:
        """Tensor bytes: a view of in-memory input, or a fresh buffer the file is read straight into."""
        if self.file is None:
            return self.take(n, what)
        self.need(n, what)
        start, out = self.pos, bytearray(n)
        view = memoryview(out)
        have = min(n, len(self.buf) - self.at)
        view[:have] = self.buf[self.at:self.at + have]
        self.at += have
        if have == n:
            return out
        readinto = getattr(self.file, "readinto", None)
        while have < n:  # buf is used up: the rest comes straight from the file
            part = view[have:have + _RAW_STEP]
            if readinto is not None:
                got = readinto(part) or 0
            else:
                chunk = self.file.read(len(part))
                got = len(chunk)
                part[:got] = chunk
            if not got:
                self._short(start + have)
            have += got
        self.base, self.buf, self.at = start + n, memoryview(b""), 0
        return out

    def skip(self, n: int, what: str) -> FileSpan:
        """Passes over ``n`` bytes of a file without reading them; where they are in the file."""
        self.need(n, what)
        span = FileSpan(self.origin + self.pos, n)
        if self.at + n <= len(self.buf):
            self.at += n
        else:
            self.base, self.buf, self.at = self.pos + n, memoryview(b""), 0
            self.file.seek(self.origin + self.base)
        return span

    def _short(self, offset: int) -> NoReturn:
        self.fail(f"the file ends at offset {offset}, short of its {self.size} bytes (did it change while read?)")
