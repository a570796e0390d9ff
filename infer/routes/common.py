"""What every router shares: OpenAI's error body, ``{"error": {"message", "type", "code"}}``, for every 4xx/5xx."""

from __future__ import annotations

from fastapi.responses import JSONResponse

KINDS = {401: "authentication_error", 403: "permission_error", 500: "server_error", 503: "service_unavailable"}


def kind_of(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    return KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")


class ErrorReply(Exception):
    """A request refused before (or instead of) its result; the app's handler turns it into an error body and
    counts it in ``/metrics``."""

    def __init__(self, status: int, message: str, kind: str | None = None):
        super().__init__(message)
        self.status, self.kind = status, kind or kind_of(status)


def error(status: int, message: str, kind: str | None = None, extra: dict | None = None,
          headers: dict | None = None) -> JSONResponse:
    """The error reply; ``extra`` adds top-level keys (the update route's SGLang fields) next to ``error``."""
    body = (extra or {}) | {"error": {"message": message, "type": kind or kind_of(status), "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)
