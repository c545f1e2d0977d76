"""A client of the admin API, for ``gpu-coordinator submit``, ``cancel`` and ``jobs``.

Plain blocking ``urllib``: one request at a time from a command line. Every failure is an
:class:`~coordinator.errors.AdminError` whose code is the API's own (``unknown_node``,
``job_exists``...) or the client's (``admin_unreachable``, ``bad_answer``).
"""

from __future__ import annotations

import json
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from coordinator.admin import ADMIN_FILE, read_admin_file
from coordinator.errors import AdminError

__all__ = ["MAX_SPEC_FILE_BYTES", "AdminClient", "load_spec_file"]

#: The largest spec file read: a spec must fit in one frame, so far less goes through.
MAX_SPEC_FILE_BYTES: Final = 1024 * 1024
_TIMEOUT_S = 30.0


def load_spec_file(path: Path) -> dict[str, Any]:
    """A spec file (``.toml`` or ``.json``, as ``gpu-agent run-local`` takes) as a JSON object.

    Only its shape is checked here: the node validates the spec and refuses it with a code.

    Raises:
        AdminError: ``bad_spec`` (unreadable, another suffix, not TOML/JSON, not a table).
    """
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise AdminError("bad_spec", f"{path}: a spec file ends in .toml or .json")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_SPEC_FILE_BYTES + 1)
    except OSError as exc:
        raise AdminError("bad_spec", f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_SPEC_FILE_BYTES:
        raise AdminError("bad_spec", f"{path} is over {MAX_SPEC_FILE_BYTES} bytes")
    try:
        text = data.decode()
        spec = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise AdminError("bad_spec", f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(spec, dict):
        raise AdminError("bad_spec", f"{path}: a spec is a table (an object) of fields")
    return spec


class AdminClient:
    """The admin API of one running coordinator."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._token = token

    @classmethod
    def from_state_dir(cls, state_dir: Path, url: str | None = None) -> AdminClient:
        """The client of the coordinator that runs with ``state_dir`` (its ``admin.json``).

        Raises:
            AdminError: as :func:`coordinator.admin.read_admin_file`.
        """
        admin = read_admin_file(state_dir / ADMIN_FILE)
        return cls(url or admin.url, admin.token)

    def submit(
        self,
        node_id: str,
        spec: dict[str, Any],
        *,
        job_id: str | None = None,
        ttl_s: float | None = None,
    ) -> str:
        """Submit a job; its id."""
        body: dict[str, Any] = {"node_id": node_id, "spec": spec}
        if job_id is not None:
            body["job_id"] = job_id
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        answer = self._request("POST", "/api/jobs", body)
        job = answer.get("job_id")
        if not isinstance(job, str):
            raise AdminError("bad_answer", f"no job id in {answer!r}")
        return job

    def cancel(self, job_id: str, reason: str = "") -> None:
        """Ask the job's node to stop it."""
        self._request("POST", f"/api/jobs/{quote(job_id, safe='')}/cancel", {"reason": reason})

    def jobs(self) -> list[dict[str, Any]]:
        """Every job, newest first (``GET /api/jobs``)."""
        jobs = self._request("GET", "/api/jobs").get("jobs")
        if not isinstance(jobs, list):
            raise AdminError("bad_answer", "no job list in the answer")
        return jobs

    def job(self, job_id: str) -> dict[str, Any]:
        """One job (``GET /api/jobs/{id}``)."""
        return self._request("GET", f"/api/jobs/{quote(job_id, safe='')}")

    def wait(
        self, job_id: str, *, timeout_s: float | None = None, poll_s: float = 0.5
    ) -> dict[str, Any]:
        """The job once it is final.

        Raises:
            AdminError: ``wait_timeout`` after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job.get("final"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                state = job.get("state")
                raise AdminError("wait_timeout", f"{job_id} is still {state} after {timeout_s} s")
            time.sleep(poll_s)

    def _request(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise _api_error(exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(
                "admin_unreachable", f"{self.url}: {reason}; is the coordinator running?"
            ) from None
        try:
            answer = json.loads(raw)
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise AdminError("bad_answer", f"{method} {path}: not a JSON object")
        return answer


def _api_error(status: int, raw: bytes) -> AdminError:
    try:
        error = json.loads(raw)["error"]
        return AdminError(str(error["code"]), str(error.get("detail", "")))
    except (ValueError, KeyError, TypeError):
        return AdminError("bad_answer", f"HTTP {status} without a coded error")
