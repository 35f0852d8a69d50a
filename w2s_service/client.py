"""A small typed client for the w2s-service REST API (``/v1``).

Every failure is one :class:`ApiError` whose ``message`` is a single readable line: the API's
field-level 422 details joined (``weak.mode: Input should be ...``), its ``detail`` string for
other 4xx/5xx, or why the server could not be reached (``status == 0``). Nothing here prints.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:  # httpx comes with the service extra; `w2s run` works without it
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
UNREACHABLE = 0  # ApiError.status when no HTTP response came back


class ApiError(Exception):
    """An API call that did not succeed: the HTTP status (0 = unreachable) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def unreachable(self) -> bool:
        """The server could not be reached, or failed on its side (5xx): worth retrying later."""
        return self.status == UNREACHABLE or self.status >= 500


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _location(loc: Any) -> str:
    # ["body", "weak", "mode"] -> "weak.mode": where the request part is obvious, leave it out.
    parts = [str(part) for part in loc] if isinstance(loc, list | tuple) else [str(loc)]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def error_message(response: httpx.Response) -> str:
    """The API's error body as one line: 422 lists become ``field: message; field: message``."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        items = []
        for item in detail:
            if isinstance(item, dict):
                where = _location(item.get("loc", []))
                msg = _one_line(item.get("msg", ""))
                items.append(f"{where}: {msg}" if where else msg)
            else:
                items.append(_one_line(str(item)))
        if items:
            return "; ".join(items)
    if isinstance(detail, str) and detail:
        return _one_line(detail)
    reason = response.reason_phrase or "error"
    body = _one_line(response.text)[:200]
    return f"HTTP {response.status_code} {reason}" + (f": {body}" if body else "")


def _transport_reason(error: httpx.TransportError) -> str:
    text = str(error).lower()
    import httpx

    if isinstance(error, httpx.TimeoutException):
        return "timed out"
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
        return "unknown host"
    return _one_line(str(error)) or type(error).__name__


class W2SClient:
    """The jobs and sweeps endpoints of one w2s-service, authenticated with a team's API key."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        headers = {"Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.has_key = bool(key)
        import httpx

        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> W2SClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        import httpx

        try:
            response = self._http.request(
                method,
                path,
                json=json,
                params={k: v for k, v in (params or {}).items() if v is not None},
                headers=headers,
            )
        except httpx.TransportError as error:
            raise ApiError(UNREACHABLE, f"cannot reach {self.url}: {_transport_reason(error)}") from None
        if response.status_code >= 400:
            message = error_message(response)
            if response.status_code == 401 and not self.has_key:
                message += " (set W2S_API_KEY or pass --key)"
            raise ApiError(response.status_code, message)
        try:
            return response.json()
        except ValueError:
            raise ApiError(
                response.status_code, f"{self.url}{path} did not answer JSON: is this a w2s-service?"
            ) from None

    @staticmethod
    def _id(value: str) -> str:
        # An id is one path segment: a stray '/' or '?' must not reach another route.
        return quote(value, safe="")

    # jobs

    def submit_job(
        self,
        spec: dict[str, Any],
        *,
        name: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """POST /v1/jobs: the spec (validated by the server) plus optional name and priority."""
        body = dict(spec)
        if name is not None:
            body["name"] = name
        if priority is not None:
            body["priority"] = priority
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._request("POST", "/v1/jobs", json=body, headers=headers)

    def list_jobs(
        self,
        *,
        status: str | None = None,
        dataset: str | None = None,
        model: str | None = None,
        name: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """GET /v1/jobs: ``{"data": [job summary, ...], "next_cursor": ...}``, newest first."""
        params = {
            "status": status,
            "dataset": dataset,
            "model": model,
            "name": name,
            "limit": limit,
            "cursor": cursor,
        }
        return self._request("GET", "/v1/jobs", params=params)

    def get_job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}: the job with its stages and, once finished, its results."""
        return self._request("GET", f"/v1/jobs/{self._id(job_id)}")

    def job_metrics(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}/metrics: ``{"series": [{stage_id, kind, seed, name, steps, values}]}``."""
        return self._request("GET", f"/v1/jobs/{self._id(job_id)}/metrics")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{self._id(job_id)}/cancel")

    def retry_job(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{self._id(job_id)}/retry")

    def export_job(self, job_id: str, to: str) -> dict[str, Any]:
        """POST /v1/jobs/{id}/export: export a succeeded job to ``to`` (mlflow or wandb) now or again."""
        return self._request("POST", f"/v1/jobs/{self._id(job_id)}/export", json={"to": to})

    def job_exports(self, job_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/jobs/{self._id(job_id)}/exports")  # type: ignore[return-value]

    # sweeps

    def submit_sweep(self, grid: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/sweeps: dataset, weak_models, strong_models, losses, seeds (and name, priority)."""
        return self._request("POST", "/v1/sweeps", json=grid)

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        """GET /v1/sweeps/{id}: status, grid, jobs and the table (one row per weak x strong job)."""
        return self._request("GET", f"/v1/sweeps/{self._id(sweep_id)}")
