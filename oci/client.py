"""A registry client over the Distribution HTTP API v2: manifests and small blobs, read-only.

Blocking (httpx's sync client, keep-alive connections); call it through
``asyncio.to_thread`` from an event loop, and close it (or use it in ``with``) when done.
One client serves any number of registries, each with its own credentials. Auth follows
the registry's ``WWW-Authenticate`` challenge: Basic, or Bearer through the token
endpoint it names (which gets the registry's login, over https only, as Docker does).
"""

from __future__ import annotations

import base64
import hashlib
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from types import TracebackType
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import msgspec

from oci.errors import ImageError, RegistryError
from oci.manifest import MANIFEST_ACCEPT, media_type_of
from oci.reference import Reference
from oci.transport import Response, exchange

__all__ = ["MAX_BODY", "Credentials", "Fetched", "RegistryClient"]

MAX_BODY = 4 * 1024 * 1024
"""The cap on any manifest, config, signature payload or token body."""

_REDIRECTS = (301, 302, 303, 307, 308)
_CHALLENGE = re.compile(r'([A-Za-z_]+)="([^"]*)"')
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{1,8192}")


@dataclass(frozen=True)
class Credentials:
    """A registry login; the password never shows in a repr."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Fetched:
    """A manifest's bytes, its media type and the sha256 digest computed over the bytes."""

    body: bytes
    media_type: str
    digest: str


class _Token(msgspec.Struct, frozen=True):
    token: str | None = None
    access_token: str | None = None


class RegistryClient:
    """Reads manifests and blobs; every failure is an OciError with a code."""

    def __init__(
        self,
        *,
        credentials: Mapping[str, Credentials] | None = None,
        ca_file: Path | None = None,
        stall: float = 30.0,
        deadline: float = 120.0,
    ) -> None:
        """``credentials`` by registry name ("docker.io", "host:5000"); ``ca_file`` is trusted
        besides the system's; a socket wait over ``stall`` seconds, or one request over
        ``deadline`` seconds, is ``pull_timeout``."""
        self._credentials = dict(credentials or {})
        context = ssl.create_default_context()
        if ca_file is not None:
            context.load_verify_locations(cafile=str(ca_file))
        self._stall = stall
        self._deadline = deadline
        self._auth: dict[tuple[str, str], str] = {}
        # Cookies off (a jar that accepts none): the API is stateless, and a registry's
        # cookie has no business at another host.
        jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self._http = httpx.Client(verify=context, follow_redirects=False, cookies=jar)

    def close(self) -> None:
        """Close the kept-alive connections."""
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def manifest(self, ref: Reference, target: str | None = None) -> Fetched:
        """GET the manifest ``target`` (default: the reference's digest or tag), checked.

        A digest target must match the bytes, and so must a Docker-Content-Digest header.
        """
        name = target or ref.target
        response = self._get(ref, f"manifests/{name}", MANIFEST_ACCEPT)
        digest = "sha256:" + hashlib.sha256(response.body).hexdigest()
        if name.startswith("sha256:") and name != digest:
            raise ImageError("digest_mismatch", f"{ref.repository}@{name}: the body is {digest}")
        header = response.headers.get("Docker-Content-Digest")
        if header is not None and header != digest:
            raise ImageError("digest_mismatch", f"{ref.repository}:{name}: header says {header}")
        media_type = media_type_of(response.body, response.headers.get("Content-Type"))
        return Fetched(body=response.body, media_type=media_type, digest=digest)

    def blob(self, ref: Reference, digest: str, size: int) -> bytes:
        """GET a small blob (a config, a signature payload): its size and digest checked."""
        if size > MAX_BODY:
            raise ImageError("manifest_too_large", f"{ref.repository}@{digest}: {size} bytes")
        body = self._get(ref, f"blobs/{digest}", "*/*").body
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if actual != digest or len(body) != size:
            raise ImageError("digest_mismatch", f"{ref.repository}@{digest}: the blob differs")
        return body

    def _get(self, ref: Reference, path: str, accept: str) -> Response:
        """GET ``/v2/<repository>/<path>``, authenticating once on a 401 and following redirects."""
        url = f"https://{ref.api_host}/v2/{ref.path}/{path}"
        scope = f"repository:{ref.path}:pull"
        key = (ref.api_host, scope)
        response = self._send(url, accept, self._auth.get(key))
        if response.status == 401:
            authorization = self._authenticate(ref, scope, response)
            response = self._send(url, accept, authorization)
            if response.status != 401:
                self._auth[key] = authorization
        for _ in range(3):
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location:
                break
            # Blob stores (S3 and the like) redirect; their URL carries its own signature.
            url = urljoin(url, location)
            same = urlsplit(url).netloc == ref.api_host
            response = self._send(url, accept, self._auth.get(key) if same else None)
        if response.status in (401, 403):
            raise RegistryError("registry_auth_failed", f"{ref.repository}: refused")
        if response.status == 404:
            raise ImageError("image_not_found", f"{ref.repository}: no {path}")
        if response.status != 200:
            raise RegistryError("registry_unreachable", f"{ref.repository}: HTTP {response.status}")
        return response

    def _send(self, url: str, accept: str, authorization: str | None) -> Response:
        headers = {"Accept": accept, "User-Agent": "gpu-agent-oci"}
        if authorization is not None:
            headers["Authorization"] = authorization
        return exchange(
            self._http,
            url,
            headers=headers,
            stall=self._stall,
            deadline=time.monotonic() + self._deadline,
            max_body=MAX_BODY,
        )

    def _authenticate(self, ref: Reference, scope: str, response: Response) -> str:
        """The Authorization header that the 401's challenge asks for."""
        challenge = response.headers.get("WWW-Authenticate") or ""
        scheme = challenge.split(" ", 1)[0].lower()
        params = dict(_CHALLENGE.findall(challenge))
        credentials = self._credentials.get(ref.registry)
        basic = None
        if credentials is not None:
            pair = f"{credentials.username}:{credentials.password}".encode()
            basic = "Basic " + base64.b64encode(pair).decode("ascii")
        if scheme == "basic":
            if basic is None:
                raise RegistryError("registry_auth_failed", f"{ref.registry}: needs a login")
            return basic
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryError("registry_auth_failed", f"{ref.registry}: unknown challenge")
        query = {"scope": scope} | ({"service": params["service"]} if "service" in params else {})
        realm = params["realm"]
        token_url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        answer = self._send(token_url, "application/json", basic)
        if answer.status != 200:
            detail = f"{ref.registry}: token HTTP {answer.status}"
            raise RegistryError("registry_auth_failed", detail)
        try:
            body = msgspec.json.decode(answer.body, type=_Token)
        except msgspec.DecodeError as error:
            raise RegistryError("registry_auth_failed", f"{ref.registry}: bad token") from error
        token = body.token or body.access_token
        if token is None or not _TOKEN.fullmatch(token):
            raise RegistryError("registry_auth_failed", f"{ref.registry}: bad token")
        return f"Bearer {token}"
