"""The errors the ingress answers with, and their OpenAI-style bodies."""

from __future__ import annotations

from typing import Any

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
                409: "ConflictError", 413: "RequestEntityTooLargeError", 429: "TooManyRequestsError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class ApiError(Exception):
    """A request the ingress refuses, with the HTTP status and the message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        """Extra response headers (``Retry-After`` on a 503)."""

    @property
    def type(self) -> str:
        return error_type(self.status)


class InvalidRequest(ApiError):
    """The body is malformed or a field has a bad value (400)."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class ModelNotFound(ApiError):
    """The body names a model this server does not serve (404)."""

    def __init__(self, model: str) -> None:
        super().__init__(404, f"model {model} does not exist")


def error_type(status: int) -> str:
    """The ``type`` field of an error body for an HTTP status, vLLM-style."""
    return _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


def error_body(status: int, message: str) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "code"}}``."""
    return {"error": {"message": message, "type": error_type(status), "code": status}}
