"""What every router shares: OpenAI's error body."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class Refused(Exception):
    """A request refused before any work; the app turns it into an OpenAI error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)
