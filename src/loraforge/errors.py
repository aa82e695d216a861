"""Domain errors, raised anywhere in the service and mapped once to OpenAI's error envelope.

Each carries the HTTP status, OpenAI ``type``, ``code`` and ``param`` it should be reported with
(``api/errors.py`` turns them into ``{"error": {message, type, param, code}}``).
"""

from __future__ import annotations


class LoraforgeError(Exception):
    """Base of every error a client should see with a message."""

    status_code = 400
    error_type = "invalid_request_error"
    # Every error carries a ``code``: the class's unless the raise names a more precise one.
    default_code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code: str = code if code is not None else self.default_code


class InvalidRequestError(LoraforgeError):
    """The request is malformed or names something unusable (400)."""


class AuthenticationError(LoraforgeError):
    """Missing or unknown API key (401)."""

    status_code = 401
    default_code = "invalid_api_key"


class NotFoundError(LoraforgeError):
    """The object does not exist, or belongs to another organization (404, never 403)."""

    status_code = 404
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    """The model is neither in the catalog nor one of the caller's fine-tuned models (404)."""

    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.", param="model"
        )


class PayloadTooLargeError(LoraforgeError):
    """An upload or part over its byte limit (413)."""

    status_code = 413
    default_code = "file_too_large"


class ServiceUnavailableError(LoraforgeError):
    """A dependency (an engine) is down; the client may retry later (503)."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"
