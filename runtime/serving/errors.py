"""The service's error answers: an :class:`HTTPError` raised anywhere in a request becomes one
JSON body ``{"error": {"status", "code", "message"}}`` with its status and headers."""

from __future__ import annotations

from starlette.responses import JSONResponse


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(e: HTTPError) -> JSONResponse:
    return JSONResponse({"error": {"status": e.status, "code": e.code, "message": e.message}},
                        e.status, headers=e.headers)
