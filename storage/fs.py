"""One place that turns a URL into an fsspec filesystem, with the settings object stores need for Baton; and what
Baton does with whole files there: list them, checksum them, replace a JSON record."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import fsspec
import xxhash
from fsspec.implementations.local import LocalFileSystem

HASH_WINDOW = 1 << 20  # bytes read then hashed at a time: small enough to stay in cache


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for ``url``; a bare path means local disk.

    For S3 the listing cache is off (another process publishes, and a cached listing would hide its manifest),
    the instance is not shared (so those options stick), and botocore's CRC32 headers are only sent when
    required (several S3-compatible servers reject them). Each object is downloaded as one stream
    (``max_concurrency=1``): the loader already fetches several parts at once, and s3fs's ranged download of one
    object starts with a full GET that it abandons, which moves bytes for nothing. ``BATON_S3_ENDPOINT`` sets
    the endpoint URL.
    """
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        options.setdefault("use_listings_cache", False)
        options.setdefault("skip_instance_cache", True)
        options.setdefault("max_concurrency", 1)
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("request_checksum_calculation", "when_required")
        config.setdefault("response_checksum_validation", "when_required")
        options["config_kwargs"] = config
        endpoint = os.environ.get("BATON_S3_ENDPOINT")
        if endpoint:
            options.setdefault("endpoint_url", endpoint)
    try:
        fs, path = fsspec.url_to_fs(url, **options)
    except ImportError as exc:
        raise ImportError(f"{url}: {exc}. For s3:// install the extra: pip install 'baton[s3]'") from exc
    except OSError as exc:  # filesystems that connect as they are made (ftp, sftp, smb) fail here, without the URL
        raise ConnectionError(f"{url}: storage unreachable: {type(exc).__name__}: {exc}") from exc
    return fs, path.rstrip("/") or path


@functools.cache
def _unreachable() -> tuple[type[BaseException], ...]:
    """Connection failures of object-store clients that are not ``OSError`` (botocore's are not)."""
    types: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
        types += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError
        types.append(ClientError)
    except ImportError:
        pass
    return tuple(types)


def storage_error(exc: BaseException) -> BaseException:
    """``exc``, or a ``ConnectionError`` (an ``OSError``) when it says the storage could not be reached, so that
    callers tell "storage is down, retry" from "this snapshot is bad" with one ``except OSError``."""
    if isinstance(exc, _unreachable()) and not isinstance(exc, OSError):
        err = ConnectionError(f"storage unreachable: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err
    return exc


F = TypeVar("F", bound=Callable[..., Any])


def storage_calls(fn: F) -> F:
    """Public entry points raise ``OSError`` for unreachable storage, whatever client library was underneath."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            err = storage_error(exc)
            if err is exc:
                raise
            raise err from exc
    return wrapper  # type: ignore[return-value]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def listing(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int]:
    """File name -> size for everything directly under ``root`` (empty when the directory is absent)."""
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        if e.get("type") == "file":
            out[e["name"].rstrip("/").rsplit("/", 1)[-1]] = int(e.get("size") or 0)
    return out


def checksums(buffers: Iterable, sha256: bool = False) -> tuple[str | None, str]:
    """(SHA-256 or None, xxh3_128) of the concatenated buffers: the checksums a manifest records per file."""
    sha, xx = hashlib.sha256() if sha256 else None, xxhash.xxh3_128()
    for b in buffers:
        if sha is not None:
            sha.update(b)
        xx.update(b)
    return sha.hexdigest() if sha is not None else None, xx.hexdigest()


def file_checksums(fs: fsspec.AbstractFileSystem, path: str, sha256: bool = False) -> tuple[str | None, str]:
    """``checksums`` of a file, read through one reused buffer: memory stays at the window, whatever happens to
    the file."""
    with (open(path, "rb", buffering=0) if is_local(fs) else fs.open(path, "rb")) as f:
        return checksums(_windows(f, bytearray(HASH_WINDOW)), sha256)


def _windows(f, buf: bytearray):
    """The file's bytes, a window of ``buf`` at a time (each valid until the next is read)."""
    view = memoryview(buf)
    while n := f.readinto(buf):
        yield view[:n]


def write_json(fs: fsspec.AbstractFileSystem, path: str, doc: dict) -> None:
    """Replaces ``path`` whole with ``doc`` as JSON: written beside, then renamed over it."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(tmp, json.dumps(doc, indent=1, sort_keys=True).encode())
    fs.mv(tmp, path)


def read_record(url: str, name: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The JSON object in file ``name`` under ``url``, None when it is absent or unreadable (a record half-written
    by hand is as good as none)."""
    fs, root = open_fs(url, storage_options)
    try:
        doc = json.loads(fs.cat_file(join(root, name)))
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
