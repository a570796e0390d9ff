"""Byte-level tokenizer: token ``i < 256`` is byte ``i``; nothing to download, any text round-trips."""

from __future__ import annotations

BOS = 256
EOS = 257


def encode(text: str, bos: bool = True) -> list[int]:
    return ([BOS] if bos else []) + list(text.encode("utf-8"))


def to_bytes(ids: list[int]) -> bytes:
    """The bytes of ``ids``; special and padding tokens carry no text and are dropped."""
    return bytes(i for i in ids if 0 <= i < 256)


def decode(ids: list[int]) -> str:
    return to_bytes(ids).decode("utf-8", errors="replace")


def token_str(token: int) -> str:
    """A string that names ``token`` uniquely (OpenAI's logprobs keys): its character when the byte is valid UTF-8
    on its own, ``bytes:\\xNN`` otherwise, and ``<|bos|>``, ``<|eos|>`` or ``<|pad:N|>`` for special ids."""
    if 0 <= token < 128:
        return chr(token)
    if token < 256:
        return f"bytes:\\x{token:02x}"
    return {BOS: "<|bos|>", EOS: "<|eos|>"}.get(token, f"<|pad:{token}|>")
