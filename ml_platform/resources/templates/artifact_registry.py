"""Pipeline templates in an Artifact Registry KFP repository, over its documented HTTP API.

A repository ``https://LOCATION-kfp.pkg.dev/PROJECT/REPO`` is reached on two hosts:

- the repository URL itself: ``POST`` a multipart form (file ``content``, field ``tags``,
  comma-separated), answered ``PACKAGE/sha256:HEX`` in plain text, and ``GET
  .../PACKAGE/VERSION_OR_TAG`` for the YAML (Vertex AI's "Create, upload, and use a pipeline
  template" page shows both with curl);
- the Artifact Registry REST API v1, ``https://artifactregistry.googleapis.com/v1/projects/
  PROJECT/locations/LOCATION/repositories/REPO/packages/PACKAGE/``: ``versions`` and
  ``tags``, each got one by one or listed a page at a time.

Every request has a timeout and goes through ``retries.call``; failures name the URL.
google-auth and requests are imported on the first request: the code location imports this
module.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlencode

from ml_platform.resources.retries import (
    RETRYABLE_STATUS,
    Backoff,
    RetryDeadlineError,
    call,
    is_transient,
    retry_after_seconds,
)
from ml_platform.resources.templates import (
    TemplateError,
    TemplateRegistry,
    TemplateVersion,
    check_tags,
    template_version_of,
)

if TYPE_CHECKING:
    import requests
    from google.auth.credentials import Credentials

# The repository URL, exactly: with a package path (or a trailing segment) the URLs built
# from it would silently address another repository.
_REPOSITORY_URL = re.compile(
    r"^https://(?P<location>[a-z0-9-]+)-kfp\.pkg\.dev/(?P<project>[^/]+)/(?P<repository>[^/]+)$"
)
_UPLOAD_ANSWER = re.compile(r"^(?P<package>[^/\s]+)/(?P<version>sha256:[0-9a-f]{64})$")
_API = "https://artifactregistry.googleapis.com/v1"
_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
# No retry starts later than this after the first attempt (nor one a Retry-After would
# push past it): a Dagster step waits minutes at most, not hours.
_DEADLINE = 120.0


class ArtifactRegistryError(TemplateError):
    """A request Artifact Registry refused, failed or did not answer in time.

    ``status`` is the HTTP status when there was an answer, ``None`` for a timeout or a
    connection that could not be made.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class ArtifactRegistryTemplates(TemplateRegistry):
    """Templates in one Artifact Registry KFP repository.

    ``repository_url`` is ``https://LOCATION-kfp.pkg.dev/PROJECT/REPO``. ``auth``: None for
    Google's Application Default Credentials (looked up on the first request), google-auth
    credentials, or any ``requests`` auth (tests pass a bearer token). ``session``: requests
    go through its transport adapters (tests pass one that reaches a local fake).
    ``retries``: further attempts after a 429/5xx answer or a failed connection, the first
    after up to ``backoff`` seconds (jittered), doubling up to ``max_backoff``, or what the
    server's Retry-After asks for. A version's ``uri`` is what Vertex accepts as a job's
    ``template_uri``: ``REPOSITORY_URL/PACKAGE/sha256:HEX``.
    """

    def __init__(
        self,
        repository_url: str,
        *,
        auth: requests.auth.AuthBase | Credentials | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        page_size: int = 100,
        session: requests.Session | None = None,
    ) -> None:
        url = repository_url.rstrip("/")
        found = _REPOSITORY_URL.fullmatch(url)
        if not found:
            raise ValueError(
                f"not an Artifact Registry KFP repository URL: {repository_url!r} "
                "(expected https://REGION-kfp.pkg.dev/PROJECT/REPOSITORY)"
            )
        if timeout <= 0 or retries < 0 or not 1 <= page_size <= 1000:
            raise ValueError("timeout must be > 0, retries >= 0 and page_size in 1..1000")
        self.repository_url = url
        self.page_size = page_size  # Artifact Registry's documented maximum is 1,000
        self._packages = (
            f"{_API}/projects/{found['project']}/locations/{found['location']}"
            f"/repositories/{found['repository']}/packages"
        )
        self._timeout = timeout  # seconds, for connecting and for every read of the answer
        self._backoff = Backoff(
            initial=backoff, maximum=max_backoff, deadline=_DEADLINE, retries=retries
        )
        self._auth = auth
        self._given_session = session
        self._session: requests.Session | None = None
        self._lock = threading.Lock()

    def upload(self, package: str, template: Path, tags: Sequence[str]) -> TemplateVersion:
        check_tags(package, tags)
        path = Path(template)
        content = path.read_bytes()  # in memory (templates are small): a retry sends it again
        form = {"tags": ",".join(tags)} if tags else {}
        url = self.repository_url
        response = self._send("POST", url, data=form, files={"content": (path.name, content)})
        answer = _UPLOAD_ANSWER.match(response.text.strip())
        if not answer:
            raise ArtifactRegistryError(
                f"unexpected answer to POST {url}: {response.text[:200]!r} "
                "(expected PACKAGE/sha256:HEX)",
                url=url,
                status=response.status_code,
            )
        stored_package, version = answer["package"], answer["version"]
        # Artifact Registry names the package itself, after the pipeline's name in the
        # template; a job would otherwise run a template filed under another name.
        if stored_package != package:
            raise TemplateError(
                f"{path} was stored as template {stored_package!r} in {self.repository_url}, "
                f"not {package!r}: the package is named after the pipeline in the template"
            )
        expected = template_version_of(content)
        if version != expected:
            raise TemplateError(
                f"{self.repository_url} stored {path} as {stored_package}/{version}, "
                f"but its content is {expected}"
            )
        return self._get_version(package, version)

    def resolve(self, package: str, tag: str) -> TemplateVersion:
        if tag.startswith("sha256:"):
            return self._get_version(package, tag)
        check_tags(package, [tag])
        try:
            found = self._get_json(f"{self._packages}/{package}/tags/{tag}")
        except ArtifactRegistryError as error:
            if error.status != 404:
                raise
            raise TemplateError(
                f"template {package!r} has no tag {tag!r} in {self.repository_url} "
                f"(tags: {self._known_tags(package)})"
            ) from error
        return self._get_version(package, _last_segment(found["version"]))

    def list_versions(self, package: str) -> list[TemplateVersion]:
        try:
            items = list(self._pages(package, "versions"))
        except ArtifactRegistryError as error:
            if error.status == 404:  # no such package (yet): like an empty folder locally
                return []
            raise
        # Newest first, as LocalTemplateRegistry lists them.
        items.sort(key=lambda item: (_timestamp(item.get("createTime")), item["name"]))
        return [self._version(package, item) for item in reversed(items)]

    def fetch(self, version: TemplateVersion) -> bytes:
        if not version.version.startswith("sha256:"):
            raise TemplateError(f"not a template version: {version.version!r}")
        url = f"{self.repository_url}/{version.package}/{version.version}"
        try:
            content = self._send("GET", url).content
        except ArtifactRegistryError as error:
            if error.status != 404:
                raise
            raise self._no_version(version.package, version.version) from error
        actual = template_version_of(content)
        if actual != version.version:
            raise TemplateError(
                f"template {version.uri} does not match {version.version}: "
                f"what was downloaded is {actual}"
            )
        return content

    def _get_version(self, package: str, version: str) -> TemplateVersion:
        try:
            # The FULL view fills relatedTags (the BASIC default leaves them out).
            found = self._get_json(f"{self._packages}/{package}/versions/{version}?view=FULL")
        except ArtifactRegistryError as error:
            if error.status != 404:
                raise
            raise self._no_version(package, version) from error
        return self._version(package, found)

    def _version(self, package: str, item: dict[str, Any]) -> TemplateVersion:
        version = _last_segment(item["name"])
        tags = sorted(_last_segment(tag["name"]) for tag in item.get("relatedTags", []))
        uri = f"{self.repository_url}/{package}/{version}"
        return TemplateVersion(package, version, uri, tuple(tags))

    def _known_tags(self, package: str) -> str:
        try:
            names = sorted(_last_segment(tag["name"]) for tag in self._pages(package, "tags"))
        except ArtifactRegistryError as error:
            if error.status == 404:
                return "none"
            return f"not listed: {error}"  # keep the message about the missing tag first
        return ", ".join(names) or "none"

    def _no_version(self, package: str, version: str) -> TemplateError:
        return TemplateError(
            f"template {package!r} has no version {version} in {self.repository_url}"
        )

    def _pages(self, package: str, kind: str) -> Iterator[dict[str, Any]]:
        """Every version or tag of a package, following ``nextPageToken`` to the last page."""
        query: dict[str, Any] = {"view": "FULL"} if kind == "versions" else {}
        query["pageSize"] = self.page_size
        seen: set[str] = set()
        while True:
            url = f"{self._packages}/{package}/{kind}?{urlencode(query)}"
            body = self._get_json(url)
            yield from body.get(kind, [])
            token = body.get("nextPageToken")
            if not token:
                return
            if token in seen:  # a server bug must not become an endless loop
                raise ArtifactRegistryError(f"{url} returned a page token twice", url=url)
            seen.add(token)
            query["pageToken"] = token

    def _get_json(self, url: str) -> dict[str, Any]:
        response = self._send("GET", url)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ArtifactRegistryError(
                f"{url} did not answer with a JSON object: {response.text[:200]!r}",
                url=url,
                status=response.status_code,
            )
        return body

    def _http(self) -> requests.Session:
        """The session every request goes through, made on the first request."""
        import requests

        with self._lock:
            if self._session is not None:
                return self._session
            if isinstance(self._auth, requests.auth.AuthBase):  # sent with each request
                self._session = self._given_session or requests.Session()
                return self._session
            import google.auth
            from google.auth.transport.requests import AuthorizedSession

            credentials = self._auth
            if credentials is None:
                credentials, _ = google.auth.default(scopes=_SCOPES)
            # AuthorizedSession adds the bearer token, refreshed when stale (and once more
            # on a 401); the given session's adapters carry the requests themselves.
            session = AuthorizedSession(credentials)
            if self._given_session is not None:
                for prefix, adapter in self._given_session.adapters.items():
                    session.mount(prefix, adapter)
            self._session = session
            return session

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One request, tried again on 429/5xx answers and failed connections."""
        import requests
        from google.auth.exceptions import GoogleAuthError

        auth = self._auth if isinstance(self._auth, requests.auth.AuthBase) else None
        attempts = 0

        def attempt() -> requests.Response:
            nonlocal attempts
            attempts += 1
            response = self._http().request(method, url, auth=auth, timeout=self._timeout, **kwargs)
            response.raise_for_status()  # an HTTPError carries the status for retries
            return response

        try:
            # A timeout is reported, not retried: the caller would wait attempts x timeout,
            # and an upload that timed out may have been stored anyway. (Sending an upload
            # again after a dropped connection is harmless: the same bytes are the same
            # version, and its tags move to it.)
            return call(
                attempt,
                transient=lambda error: is_transient(error, timeouts=False),
                backoff=self._backoff,
                retry_after=_retry_after,
            )
        except Exception as raised:
            # The deadline ended the retries: the last attempt's error says what happened.
            error = raised.cause if isinstance(raised, RetryDeadlineError) else raised
            status = None
            if isinstance(error, requests.HTTPError) and error.response is not None:
                status = error.response.status_code
                plural = "s" if attempts > 1 else ""
                tries = f" after {attempts} attempt{plural}" if status in RETRYABLE_STATUS else ""
                message = (
                    f"Artifact Registry answered {method} {url} with HTTP {status}"
                    f"{tries}: {_google_message(error.response)}"
                )
            elif isinstance(error, requests.Timeout):
                message = (
                    f"Artifact Registry did not answer {method} {url} within {self._timeout:g} s"
                )
            elif isinstance(error, GoogleAuthError):
                message = f"no Google credentials for {method} {url}: {error}"
            elif is_transient(error, timeouts=False):  # a failed connection, every attempt
                message = (
                    f"could not reach Artifact Registry for {method} {url} "
                    f"({attempts} attempts): {error}"
                )
            elif isinstance(error, requests.RequestException):
                message = f"{method} {url} failed: {error}"
            else:
                raise  # not a failed request but a bug: as it is
            raise ArtifactRegistryError(message, url=url, status=status) from error


def _retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    return retry_after_seconds(response.headers) if response is not None else None


def _last_segment(resource_name: str) -> str:
    """``.../packages/P/versions/sha256:HEX`` -> ``sha256:HEX`` (AR may escape the colon)."""
    return unquote(resource_name.rsplit("/", 1)[-1])


def _timestamp(value: str | None) -> datetime:
    try:  # RFC 3339 with up to nanoseconds; fromisoformat truncates past microseconds
        return datetime.fromisoformat(value) if value else datetime.min.replace(tzinfo=UTC)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def _google_message(response: requests.Response) -> str:
    """The status and message of a Google API error body, else the start of the body."""
    try:
        error = response.json().get("error", {})
        return f"{error.get('status', '')} {error['message']}".strip()
    except (ValueError, AttributeError, KeyError, TypeError):
        return response.text[:200].strip() or response.reason or "no details"
