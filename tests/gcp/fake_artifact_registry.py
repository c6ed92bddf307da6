"""A local stand-in for an Artifact Registry KFP repository, for wire tests of
``ArtifactRegistryTemplates``.

It serves the two hosts a client of a repository ``https://LOCATION-kfp.pkg.dev/PROJECT/REPO``
talks to (the same two kfp's RegistryClient uses: kfp/registry/context/kfp_pkg_dev.json):

- ``LOCATION-kfp.pkg.dev``: ``POST /PROJECT/REPO`` with a multipart form (``content``: the
  compiled YAML, ``tags``: comma-separated), answered with ``PACKAGE/sha256:HEX`` in plain
  text; ``GET /PROJECT/REPO/PACKAGE/{sha256:HEX|TAG}`` answers the YAML.
- ``artifactregistry.googleapis.com``: the v1 REST resources under
  ``/v1/projects/P/locations/L/repositories/R``: ``packages[/PKG]``,
  ``packages/PKG/versions[/V]`` (``view=FULL`` adds ``relatedTags``) and
  ``packages/PKG/tags[/T]``; lists take ``pageSize`` (at most 1,000) and ``pageToken`` and
  answer ``nextPageToken`` while more remain; errors are Google's
  ``{"error": {"code", "message", "status"}}``; a request without a bearer token is 401.

As Artifact Registry does, the package is named after the template's
``pipelineInfo.name``, the version is the sha256 of the uploaded bytes, uploading the same
bytes again makes no new version, and an uploaded tag moves to the uploaded version.

The server listens on 127.0.0.1 over plain HTTP. ``session()`` is a ``requests`` session
whose transport adapter sends requests for those two hosts there, unchanged except for the
scheme and address (the Host header keeps the real host, which the server routes on), and
refuses every other host, so a test can never reach Google. The client under test thus
builds exactly the URLs it builds in production.

Every request is recorded (``requests``); ``fail``, ``drop`` and ``hang`` inject faults.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import requests
import yaml
from requests.adapters import HTTPAdapter

from tests.gcp.loopback import LoopbackServer

API_HOST = "artifactregistry.googleapis.com"
MAX_PAGE_SIZE = 1000  # documented for versions.list and tags.list


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    host: str
    path: str  # without the query, percent-decoded
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def url(self) -> str:
        return f"https://{self.host}{self.path}"


_DROP = -1  # a fault's status: close the connection without answering


@dataclass
class _Fault:
    status: int | None  # an HTTP status, _DROP, or None: hang instead of answering
    seconds: float
    path_contains: str
    remaining: int
    retry_after: str | None = None


@dataclass
class _Version:
    content: bytes
    created: datetime
    updated: datetime


@dataclass
class _Package:
    created: datetime
    versions: dict[str, _Version] = field(default_factory=dict)  # in upload order
    tags: dict[str, str] = field(default_factory=dict)  # tag -> version


class _HttpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class FakeArtifactRegistry:
    def __init__(
        self,
        project: str = "acme-ml",
        location: str = "us-central1",
        repository: str = "pipeline-templates",
        default_page_size: int = 50,
    ) -> None:
        self.project, self.location, self.repository = project, location, repository
        self.upload_host = f"{location}-kfp.pkg.dev"
        self.repository_url = f"https://{self.upload_host}/{project}/{repository}"
        self.resource = f"projects/{project}/locations/{location}/repositories/{repository}"
        self.default_page_size = default_page_size
        self.requests: list[RecordedRequest] = []
        self._packages: dict[str, _Package] = {}
        self._faults: list[_Fault] = []
        self._clock = datetime(2024, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()
        self._release = threading.Event()  # ends injected hangs when the server stops
        self._server: LoopbackServer | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeArtifactRegistry:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = LoopbackServer(handler)
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()

    def __enter__(self) -> FakeArtifactRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the fake first"
        return self._server.port

    def session(self) -> requests.Session:
        """A session that reaches this fake for the Artifact Registry hosts, and nothing else."""
        session = requests.Session()
        adapter = _LoopbackAdapter(self)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        return session

    # -- test controls ---------------------------------------------------------------------

    def fail(
        self,
        status: int = 503,
        *,
        times: int = 1,
        path_contains: str = "",
        retry_after: str | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (a Google error body)."""
        with self._lock:
            self._faults.append(_Fault(status, 0.0, path_contains, times, retry_after))

    def hang(self, seconds: float, *, times: int = 1, path_contains: str = "") -> None:
        """Hold the next ``times`` matching requests ``seconds`` without answering."""
        with self._lock:
            self._faults.append(_Fault(None, seconds, path_contains, times))

    def drop(self, *, times: int = 1, path_contains: str = "") -> None:
        """Close the connection of the next ``times`` matching requests without answering."""
        with self._lock:
            self._faults.append(_Fault(_DROP, 0.0, path_contains, times))

    def tamper(self, package: str, version: str, content: bytes) -> None:
        """Serve other bytes for a stored version (what a broken registry or proxy would do)."""
        with self._lock:
            self._packages[package].versions[version].content = content

    def requests_to(self, path_contains: str, method: str = "GET") -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and path_contains in r.path]

    # -- the service -----------------------------------------------------------------------

    def handle(self, request: RecordedRequest) -> tuple[int, dict[str, str], bytes] | None:
        """The answer to a request: status, headers and body; ``None`` to drop the connection."""
        with self._lock:
            self.requests.append(request)
            fault = next(
                (f for f in self._faults if f.remaining and f.path_contains in request.path),
                None,
            )
            if fault:
                fault.remaining -= 1
        if fault and fault.status == _DROP:
            return None
        if fault and fault.status is None:
            self._release.wait(fault.seconds)
            return _error(503, "the fake held this request (injected hang)")
        if fault:
            status, headers, body = _error(fault.status, "injected fault")
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            return status, headers, body
        try:
            if not request.headers.get("authorization", "").startswith("Bearer "):
                raise _HttpError(401, "Request is missing required authentication credential.")
            with self._lock:
                return self._route(request)
        except _HttpError as error:
            return _error(error.code, error.message)

    def _route(self, request: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        method, path = request.method, request.path
        if request.host == self.upload_host:
            prefix = f"/{self.project}/{self.repository}"
            if method == "POST" and path == prefix:
                return self._upload(request)
            parts = path.removeprefix(prefix + "/").split("/")
            if method == "GET" and path.startswith(prefix + "/") and len(parts) == 2:
                return self._download(*parts)
        elif request.host == API_HOST and method == "GET":
            prefix = f"/v1/{self.resource}/packages"
            if path == prefix or path.startswith(prefix + "/"):
                parts = [part for part in path[len(prefix) :].split("/") if part]
                return self._api_get(parts, request.query)
        raise _HttpError(404, f"no such resource: {method} {path}")

    def _upload(self, request: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        form = _multipart_fields(request.headers.get("content-type", ""), request.body)
        if "content" not in form:
            raise _HttpError(400, "the form has no 'content' file")
        content = form["content"]
        try:
            package = yaml.safe_load(content)["pipelineInfo"]["name"]
        except (yaml.YAMLError, TypeError, KeyError) as error:
            raise _HttpError(400, f"not a KFP template (no pipelineInfo.name): {error}") from None
        version = "sha256:" + hashlib.sha256(content).hexdigest()
        now = self._tick()
        entry = self._packages.setdefault(package, _Package(created=now))
        if version in entry.versions:
            entry.versions[version].updated = now
        else:
            entry.versions[version] = _Version(content, now, now)
        tags = form.get("tags", b"").decode()
        for tag in filter(None, (t.strip() for t in tags.split(","))):
            entry.tags[tag] = version  # a tag names one version per package: it moves
        return 200, {"Content-Type": "text/plain"}, f"{package}/{version}".encode()

    def _download(self, package: str, ref: str) -> tuple[int, dict[str, str], bytes]:
        entry = self._package(package)
        version = ref if ref.startswith("sha256:") else entry.tags.get(ref)
        if version not in entry.versions:
            raise _HttpError(404, f"{package}/{ref} not found")
        return 200, {"Content-Type": "application/x-yaml"}, entry.versions[version].content

    def _api_get(
        self, parts: list[str], query: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        if not parts:
            items = [self._package_json(name) for name in sorted(self._packages)]
            return _json(self._page(items, "packages", query))
        entry = self._package(parts[0])
        package = parts[0]
        if len(parts) == 1:
            return _json(self._package_json(package))
        full = query.get("view") == "FULL"
        if parts[1:] == ["versions"]:
            items = [self._version_json(package, v, full) for v in entry.versions]
            return _json(self._page(items, "versions", query))
        if parts[1:] == ["tags"]:
            items = [self._tag_json(package, t) for t in sorted(entry.tags)]
            return _json(self._page(items, "tags", query))
        if len(parts) == 3 and parts[1] == "versions" and parts[2] in entry.versions:
            return _json(self._version_json(package, parts[2], full))
        if len(parts) == 3 and parts[1] == "tags" and parts[2] in entry.tags:
            return _json(self._tag_json(package, parts[2]))
        raise _HttpError(404, "Requested entity was not found.")

    def _page(self, items: list[dict], key: str, query: dict[str, str]) -> dict[str, Any]:
        try:
            size = int(query.get("pageSize") or 0) or self.default_page_size
            token = query.get("pageToken")
            start = int(base64.urlsafe_b64decode(token).decode().split(":")[1]) if token else 0
        except (ValueError, IndexError):
            raise _HttpError(400, "invalid page size or token") from None
        size = min(size, MAX_PAGE_SIZE)
        page: dict[str, Any] = {key: items[start : start + size]}
        if start + size < len(items):
            # Opaque to the client, as Google's tokens are.
            page["nextPageToken"] = base64.urlsafe_b64encode(
                f"{key}:{start + size}".encode()
            ).decode()
        return page

    def _package(self, package: str) -> _Package:
        if package not in self._packages:
            raise _HttpError(404, "Requested entity was not found.")
        return self._packages[package]

    def _package_json(self, package: str) -> dict[str, Any]:
        entry = self._packages[package]
        updated = max((v.updated for v in entry.versions.values()), default=entry.created)
        return {
            "name": f"{self.resource}/packages/{package}",
            "createTime": _rfc3339(entry.created),
            "updateTime": _rfc3339(updated),
        }

    def _version_json(self, package: str, version: str, full: bool) -> dict[str, Any]:
        stored = self._packages[package].versions[version]
        item: dict[str, Any] = {
            "name": f"{self.resource}/packages/{package}/versions/{version}",
            "createTime": _rfc3339(stored.created),
            "updateTime": _rfc3339(stored.updated),
        }
        if full:
            tags = self._packages[package].tags
            item["relatedTags"] = [
                self._tag_json(package, t) for t in sorted(tags) if tags[t] == version
            ]
        return item

    def _tag_json(self, package: str, tag: str) -> dict[str, Any]:
        version = self._packages[package].tags[tag]
        return {
            "name": f"{self.resource}/packages/{package}/tags/{tag}",
            "version": f"{self.resource}/packages/{package}/versions/{version}",
        }

    def _tick(self) -> datetime:
        # A clock that only moves on uploads keeps createTime ordering deterministic.
        self._clock += timedelta(seconds=1, microseconds=123456)
        return self._clock


class _Handler(BaseHTTPRequestHandler):
    fake: FakeArtifactRegistry
    protocol_version = "HTTP/1.1"  # keep-alive, as requests' connection pool expects
    # Headers and body go out in two writes; without this, Nagle's algorithm and delayed
    # ACKs add ~40 ms to every request.
    disable_nagle_algorithm = True

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        request = RecordedRequest(
            method=self.command,
            host=self.headers.get("Host", ""),
            path=unquote(parts.path),
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        answer = self.fake.handle(request)
        if answer is None:
            self.close_connection = True
            return
        status, headers, payload = answer
        try:
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a timeout test)

    do_GET = do_POST = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the recorded requests are the log


class _LoopbackAdapter(HTTPAdapter):
    """Sends requests for the Artifact Registry hosts to the fake; refuses any other host."""

    def __init__(self, fake: FakeArtifactRegistry) -> None:
        super().__init__(max_retries=0)
        self._fake = fake

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any):
        parts = urlsplit(request.url)
        if parts.hostname not in (self._fake.upload_host, API_HOST):
            raise requests.ConnectionError(
                f"the fake Artifact Registry does not serve {parts.hostname}: "
                "tests must not reach the internet",
                request=request,
            )
        request.headers["Host"] = parts.netloc
        address = f"127.0.0.1:{self._fake.port}"
        request.url = urlunsplit(("http", address, parts.path, parts.query, ""))
        return super().send(request, *args, **kwargs)


def _multipart_fields(content_type: str, body: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body, by name (the stdlib email parser reads it)."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    if not message.is_multipart():
        raise _HttpError(400, "expected a multipart/form-data upload")
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.iter_parts()
    }


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Google's canonical status for each HTTP code (https://cloud.google.com/apis/design/errors).
_CANONICAL = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _error(code: int, message: str) -> tuple[int, dict[str, str], bytes]:
    body = {"error": {"code": code, "message": message, "status": _CANONICAL.get(code, "UNKNOWN")}}
    return code, {"Content-Type": "application/json"}, json.dumps(body).encode()


def _json(body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()
