"""One place that turns a URL into an fsspec filesystem, with the settings object stores need for Baton."""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for ``url``; a bare path means local disk.

    For S3 the listing cache is off (another process publishes, and a cached listing would hide its manifest),
    the instance is not shared (so those options stick), and botocore's CRC32 headers are only sent when
    required (several S3-compatible servers reject them). ``BATON_S3_ENDPOINT`` sets the endpoint URL.
    """
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        options.setdefault("use_listings_cache", False)
        options.setdefault("skip_instance_cache", True)
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
    return fs, path.rstrip("/") or path


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
