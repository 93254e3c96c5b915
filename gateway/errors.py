"""The gateway's errors and their one HTTP rendering: the OpenAI error shape
``{"error": {"message", "type", "param", "code"}}``. Statuses are decided here and nowhere else."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse


class ErrorJSON(JSONResponse):
    """Rendered as ASCII (non-ASCII escaped): an error message may quote client text, and escaping can never fail
    to encode, whatever that text holds."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.retry_after = message, param, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        if self.retry_after is not None:
            headers = {**(headers or {}), "retry-after": str(self.retry_after)}
        return ErrorJSON(self.body(), status_code=self.status, headers=headers)


class InvalidRequest(APIError):
    status, type = 400, "invalid_request_error"


class NotFound(APIError):
    status, type = 404, "invalid_request_error"


class MethodNotAllowed(APIError):
    status, type = 405, "invalid_request_error"


class RequestTimeout(APIError):
    """The request body did not arrive in time."""

    status, type = 408, "invalid_request_error"


class PayloadTooLarge(APIError):
    status, type = 413, "invalid_request_error"


class Unavailable(APIError):
    """A tier has no live worker or Redis is unreachable: retry later."""

    status, type = 503, "service_unavailable"


class Overloaded(Unavailable):
    """Past an admission bound (in-flight requests, a tier's backlog): retry after a moment. 429 is kept for
    per-key rate limits."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, code="server_overloaded", retry_after=retry_after)


class Timeout(APIError):
    """A tier did not answer within its bound."""

    status, type = 504, "timeout"


class Internal(APIError):
    status, type = 500, "server_error"
