"""A client of the admin API, for ``gpu-coordinator submit``, ``cancel``, ``jobs``,
``deploy``, ``undeploy`` and ``deployments``.

Plain blocking ``http.client``: one request at a time from a command line. Every failure is an
:class:`~coordinator.errors.AdminError` whose code is the API's own (``unknown_node``,
``job_exists``...) or the client's (``bad_url``, ``admin_unreachable``, ``admin_timeout``,
``bad_answer``).
Answers are read up to a bound and checked for their shape: whatever ``--url`` points at
may answer anything.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import socket
import threading
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit

import msgspec

from coordinator.admin import ADMIN_FILE, check_url, read_admin_file
from coordinator.errors import AdminError, JobError
from coordinator.offers import check_spec
from oci import Credentials
from sandbox.files import read_regular
from sandbox.spec import MAX_SPEC_BYTES

__all__ = ["MAX_ANSWER_BYTES", "AdminClient", "load_spec_file"]

#: The largest answer read: a job's detail holds at most its spec, offer, logs and receipt.
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024
_TIMEOUT_S = 30.0


class _JobRow(msgspec.Struct):
    """What ``gpu-coordinator jobs`` shows of each job; other fields are let through."""

    job_id: str
    node_id: str
    state: str
    updated: float


class _DeploymentRow(msgspec.Struct):
    """What ``gpu-coordinator deployments`` prints of a deployment (the rest is ignored)."""

    name: str
    replicas: int
    ready: int
    live: list[dict[str, Any]]


def load_spec_file(path: Path) -> dict[str, Any]:
    """A spec file (``.toml`` or ``.json``, as ``gpu-agent run-local`` takes) as a JSON object.

    It is validated as a node validates the spec of an offer, so that nothing a node would
    refuse for its form is sent; the table is returned as written (sizes as given).

    Raises:
        JobError: ``bad_spec`` (another suffix, not a regular file, unreadable), or a code
            of :func:`coordinator.offers.check_spec` (``spec_too_large`` past 1 MiB...).
    """
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise JobError("bad_spec", f"{path}: a spec file ends in .toml or .json")
    data = _read_spec(path)
    if suffix == ".toml":
        check_spec(data, "toml")
        return tomllib.loads(data.decode())  # what check_spec just read without an error
    check_spec(data, "json")
    return msgspec.json.decode(data, type=dict[str, Any])


def _read_spec(path: Path) -> bytes:
    """The bytes of a regular spec file of at most MAX_SPEC_BYTES (a FIFO or device is
    refused without waiting on it)."""
    try:
        return read_regular(path, MAX_SPEC_BYTES)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise JobError(
                "spec_too_large", f"{path}: a spec may be at most {MAX_SPEC_BYTES} bytes"
            ) from None
        raise JobError("bad_spec", f"cannot read {path}: {exc.strerror}") from None


class AdminClient:
    """The admin API of one running coordinator."""

    def __init__(self, url: str, token: str, *, timeout_s: float | None = None) -> None:
        """A client of the API at ``url`` (AdminError ``bad_url`` if it is not an URL),
        that gives each request ``timeout_s`` (30 s) in all, from connecting to the last
        byte of the answer (AdminError ``admin_timeout`` past it)."""
        self.url = check_url(url).rstrip("/")
        self._token = token
        self._timeout_s = _TIMEOUT_S if timeout_s is None else timeout_s

    @classmethod
    def from_state_dir(cls, state_dir: Path, url: str | None = None) -> AdminClient:
        """The client of the coordinator that runs with ``state_dir`` (its ``admin.json``).

        Raises:
            AdminError: ``bad_url``, or as :func:`coordinator.admin.read_admin_file`.
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
        uploads: dict[str, str] | None = None,
        registry_logins: Mapping[str, Credentials] | None = None,
    ) -> str:
        """Submit a job; its id. ``uploads``: output path -> a PUT URL of the submitter's;
        ``registry_logins``: a short-lived login to the image's registry, for the node."""
        body: dict[str, Any] = {"node_id": node_id, "spec": spec}
        if uploads:
            body["uploads"] = {path: {"url": url} for path, url in uploads.items()}
        if registry_logins:
            body["registry_logins"] = _logins(registry_logins)
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

    def prefetch(self, node_id: str, image: str) -> str:
        """Ask a node to pull an image now; the image as pinned."""
        path = f"/api/nodes/{quote(node_id, safe='')}/prefetch"
        pinned = self._request("POST", path, {"image": image}).get("image")
        if not isinstance(pinned, str):
            raise AdminError("bad_answer", f"no image in the answer: {pinned!r}")
        return pinned

    def deploy(
        self,
        name: str,
        spec: dict[str, Any],
        replicas: int,
        registry_logins: Mapping[str, Credentials] | None = None,
    ) -> dict[str, Any]:
        """Deploy ``replicas`` replicas of a service spec as ``name``; the deployment.
        ``registry_logins``: a login to a private image's registry, for every replica."""
        body: dict[str, Any] = {"name": name, "spec": spec, "replicas": replicas}
        if registry_logins:
            body["registry_logins"] = _logins(registry_logins)
        return self._request("POST", "/api/deployments", body)

    def scale(self, name: str, replicas: int) -> dict[str, Any]:
        """Change how many replicas a deployment keeps; the deployment."""
        path = f"/api/deployments/{quote(name, safe='')}/scale"
        return self._request("POST", path, {"replicas": replicas})

    def undeploy(self, name: str) -> list[str]:
        """Cancel every replica of a deployment and forget it; the jobs cancelled."""
        answer = self._request("DELETE", f"/api/deployments/{quote(name, safe='')}")
        try:
            return msgspec.convert(answer.get("cancelled"), list[str])
        except msgspec.ValidationError as exc:
            raise AdminError("bad_answer", f"not a list of jobs cancelled: {exc}") from None

    def deployments(self) -> list[dict[str, Any]]:
        """Every deployment, by name (``GET /api/deployments``)."""
        found = self._request("GET", "/api/deployments").get("deployments")
        try:
            msgspec.convert(found, list[_DeploymentRow])
            return msgspec.convert(found, list[dict[str, Any]])
        except msgspec.ValidationError as exc:
            raise AdminError("bad_answer", f"not a deployment list: {exc}") from None

    def create_key(self, name: str, rate_per_min: int) -> dict[str, Any]:
        """Make a gateway API key; the answer holds its text (``key``), shown this once."""
        return self._request("POST", "/api/keys", {"name": name, "rate_per_min": rate_per_min})

    def keys(self) -> list[dict[str, Any]]:
        """The gateway's API keys, without their text (``GET /api/keys``)."""
        keys = self._request("GET", "/api/keys").get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
            raise AdminError("bad_answer", f"not a key list: {keys!r}")
        return keys

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        """Revoke a gateway API key."""
        return self._request("POST", f"/api/keys/{quote(key_id, safe='')}/revoke")

    def jobs(self) -> list[dict[str, Any]]:
        """Every job, newest first (``GET /api/jobs``)."""
        jobs = self._request("GET", "/api/jobs").get("jobs")
        try:
            msgspec.convert(jobs, list[_JobRow])
            return msgspec.convert(jobs, list[dict[str, Any]])
        except msgspec.ValidationError as exc:
            raise AdminError("bad_answer", f"not a job list: {exc}") from None

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

    def output(self, job_id: str, path: str, max_bytes: int) -> bytes:
        """One output of a job as the coordinator's artifact store holds it.

        Raises:
            AdminError: the API's code (``output_missing``), ``output_too_large``.
        """
        where = f"/api/jobs/{quote(job_id, safe='')}/outputs/{quote(path)}"
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            status, raw = self._exchange("GET", where, None, headers, max_bytes)
        except _Expired:
            raise AdminError("admin_timeout", f"{where}: not whole within the timeout") from None
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise AdminError("admin_unreachable", f"{self.url}: {exc}") from None
        if not 200 <= status < 300:
            raise _api_error(status, raw)
        if len(raw) > max_bytes:
            raise AdminError("output_too_large", f"{path}: over {max_bytes} bytes")
        return raw

    def _request(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        data = None if body is None else msgspec.json.encode(body)
        headers = {"Authorization": f"Bearer {self._token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            status, raw = self._exchange(method, path, data, headers)
        except _Expired:
            raise AdminError(
                "admin_timeout", f"{self.url}: no whole answer within {self._timeout_s:g} s"
            ) from None
        except http.client.HTTPException as exc:  # something answered, not in HTTP
            raise AdminError("bad_answer", f"{self.url} does not answer HTTP: {exc!r}") from None
        except (OSError, ValueError) as exc:
            # ValueError: a host name that cannot be encoded (IDNA).
            raise AdminError(
                "admin_unreachable", f"{self.url}: {exc}; is the coordinator running?"
            ) from None
        if not 200 <= status < 300:
            raise _api_error(status, raw)
        answer = _json_object(raw)
        if answer is None:
            raise AdminError("bad_answer", f"{method} {path}: not a JSON object")
        return answer

    def _exchange(
        self,
        method: str,
        path: str,
        data: bytes | None,
        headers: dict[str, str],
        max_bytes: int = MAX_ANSWER_BYTES,
    ) -> tuple[int, bytes]:
        """One request and its whole answer (status, at most MAX_ANSWER_BYTES + 1 bytes),
        within the timeout in all: a socket timeout alone is per read, and a server that
        drips a byte now and then would hold the command for ever.

        Raises:
            _Expired: the timeout passed (the socket was shut down under the reads).
        """
        deadline = time.monotonic() + self._timeout_s
        parts = urlsplit(self.url)
        kind = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        connection = kind(parts.hostname or "", parts.port, timeout=self._timeout_s)
        expired = threading.Event()
        timer: threading.Timer | None = None
        try:
            connection.connect()
            sock = connection.sock
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Expired

            def expire() -> None:
                expired.set()
                # Wakes the read blocked on it; closed already is fine.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

            timer = threading.Timer(left, expire)
            timer.daemon = True
            timer.start()
            connection.request(method, parts.path + path, body=data, headers=headers)
            with connection.getresponse() as response:
                raw = response.read(max_bytes + 1)
                status = response.status
        except (http.client.HTTPException, OSError):
            if expired.is_set():
                raise _Expired from None
            raise
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()
            connection.close()
        if expired.is_set():  # the last read came just as the time was up
            raise _Expired
        return status, raw


class _Expired(Exception):
    """The admin API took longer than the timeout for a whole exchange."""


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """``raw`` as a JSON object, or None (too large, not JSON, nested too deeply...)."""
    if len(raw) > MAX_ANSWER_BYTES:
        return None
    try:
        return msgspec.json.decode(raw, type=dict[str, Any])
    except (msgspec.DecodeError, RecursionError):
        return None


def _api_error(status: int, raw: bytes) -> AdminError:
    error = (_json_object(raw) or {}).get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return AdminError(error["code"], str(error.get("detail", "")))
    return AdminError("bad_answer", f"HTTP {status} without a coded error")


def _logins(logins: Mapping[str, Credentials]) -> dict[str, dict[str, str]]:
    """Registry logins as the API takes them."""
    return {
        host: {"username": login.username, "password": login.password}
        for host, login in logins.items()
    }
