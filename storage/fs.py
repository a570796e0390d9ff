"""One place that turns a URL into an fsspec filesystem, with the settings object stores need for Baton."""

from __future__ import annotations

import functools
import mmap
import os
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem


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
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
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


def read_whole(fs, path: str) -> bytes | mmap.mmap:
    """A part's bytes: mapped when local, so the page cache serves them without a copy into this process (parts are
    never rewritten in place: a pruned one stays readable through the mapping); read whole otherwise."""
    if not is_local(fs):
        return fs.cat_file(path)
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
