"""The domain's errors, each with the HTTP status it means. The API maps these (and only these,
plus spec errors and invalid transitions) to 4xx answers; anything else is a bug and answers 500
with a request id that is also in the log."""

from __future__ import annotations


class ServiceError(Exception):
    """An error the caller can act on; ``status_code`` is what the API answers, with a Retry-After
    header when ``retry_after_s`` says waiting helps."""

    status_code = 400
    retry_after_s: int | None = None


class NotFound(ServiceError, LookupError):
    """The object does not exist for this team (another team's objects are 'not found' too)."""

    status_code = 404


class Conflict(ServiceError):
    """The request collides with the current state (a taken name, a concurrent change)."""

    status_code = 409

    def __init__(self, message: str, *, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidInput(ServiceError, ValueError):
    """A value in the request cannot be used; the message names it and the fix."""

    status_code = 422


class LimitExceeded(ServiceError):
    """Over a limit. Sizes (stages per job, upload storage) answer 422: waiting does not help.
    Backlog and rate answer 429 with ``retry_after_s``: waiting does."""

    def __init__(self, message: str, *, limit: str, value: int, retry_after_s: int | None = None):
        super().__init__(message)
        self.limit, self.value, self.retry_after_s = limit, value, retry_after_s
        self.status_code = 429 if retry_after_s is not None else 422
