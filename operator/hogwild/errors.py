"""Errors every hogwild message and route shares: a code, the HTTP status it maps to, a message for a person.

Pure: no I/O. `hogwild.protocol` re-exports these; the sample schema (hogwild.samples) raises ProtocolError too.
"""

from __future__ import annotations

# Error codes and the HTTP status each one maps to on the serving port (docs/design.md "Contracts").
ERROR_STATUS = {
    "bad_request": 400,
    "unsupported_version": 400,
    "unknown_type": 400,
    "unauthorized": 401,
    "not_found": 404,
    "busy": 409,
    "too_large": 413,
    "invalid": 422,
    "internal": 500,
    "not_connected": 503,
    "timeout": 504,
}
MAX_ERROR_MESSAGE_CHARS = 1000


class ProtocolError(Exception):
    """A request that cannot be served. `code` is one of ERROR_STATUS; the message is for a person."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_STATUS:
            raise ValueError(f"unknown error code {code!r}")
        if len(message) > MAX_ERROR_MESSAGE_CHARS:  # it may quote the offending value, which may be huge
            message = message[:MAX_ERROR_MESSAGE_CHARS] + " [...]"
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return ERROR_STATUS[self.code]
