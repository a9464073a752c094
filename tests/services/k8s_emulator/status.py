"""``ApiError``: a failure the API server answers with a ``Status`` object, and the ``Status`` bodies themselves."""

from __future__ import annotations

from typing import Any

#: HTTP status -> the ``reason`` the API server puts in its Status.
REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "AlreadyExists",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "InternalError",
}


class ApiError(Exception):
    """Raised anywhere in the emulator; the API layer turns it into a ``Status`` response with ``code``."""

    def __init__(self, code: int, message: str, *, reason: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or REASONS.get(code, "Unknown")
        self.details = details

    def body(self) -> dict[str, Any]:
        return failure(self.code, self.reason, self.message, self.details)


def failure(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def success(details: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}


def not_found(resource: str, name: str) -> ApiError:
    """``jobs.batch "x" not found``, as the API server words it."""
    return ApiError(404, f'{resource} "{name}" not found', details={"name": name, "kind": resource.split(".")[0]})


def conflict(resource: str, name: str) -> ApiError:
    message = (
        f'Operation cannot be fulfilled on {resource} "{name}": the object has been modified; please apply your'
        " changes to the latest version and try again"
    )
    return ApiError(409, message, reason="Conflict")


class Invalid(ApiError):
    """422 ``Invalid``: ``<Kind>.<group> "<name>" is invalid: <field>: <problem>`` with one cause per problem."""

    def __init__(self, kind: str, group: str, name: str, causes: list[tuple[str, str, str]]) -> None:
        described = [f"{field}: {message}" for field, _, message in causes]
        joined = described[0] if len(described) == 1 else "[" + ", ".join(described) + "]"
        qualified = f"{kind}.{group}" if group else kind
        details = {
            "name": name,
            "group": group,
            "kind": kind,
            "causes": [{"reason": reason, "message": message, "field": field} for field, reason, message in causes],
        }
        super().__init__(422, f'{qualified} "{name}" is invalid: {joined}', details=details)
        self.causes = causes
