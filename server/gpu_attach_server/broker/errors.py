"""The broker's domain errors; ``app.py`` maps each to its HTTP status in one place."""

from __future__ import annotations

from typing import Any

from .quotas import Refusal


class BrokerError(Exception):
    status = 400
    reason = "bad_request"

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.extra = extra


class NotFound(BrokerError):
    status, reason = 404, "not_found"


class Forbidden(BrokerError):
    status, reason = 403, "forbidden"


class Conflict(BrokerError):
    status, reason = 409, "conflict"


class NoCapacity(BrokerError):
    """No GPU can take the request now (``busy``) or ever (``too_large``)."""

    status = 409

    def __init__(self, message: str, never: bool, **extra: Any):
        super().__init__(message, **extra)
        self.reason = "too_large" if never else "busy"


class OverQuota(BrokerError):
    """The request would take its user (or group) over a quota; ``extra`` has the numbers."""

    status, reason = 409, "over_quota"

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.message(), **refusal.to_json())
