"""Pipeline templates in Artifact Registry (a KFP-format repository), through kfp's RegistryClient.

``kfp.registry.RegistryClient`` knows the URLs of Artifact Registry's KFP support and how to
authenticate (Google default credentials, refreshed when stale). For a host
``https://REGION-kfp.pkg.dev/PROJECT/REPO`` it uses two services (kfp's
``registry/context/kfp_pkg_dev.json``):

- the repository URL itself: multipart upload (``POST``, fields ``content`` and ``tags``,
  answered with ``PACKAGE/sha256:HEX``) and download (``GET .../PACKAGE/VERSION_OR_TAG``);
- the Artifact Registry REST API, ``https://artifactregistry.googleapis.com/v1/projects/
  PROJECT/locations/REGION/repositories/REPO/packages/...``, for versions and tags.

What a production caller needs on top, added here: a timeout on every HTTP call (kfp's
``requests`` calls have none, so a stalled connection would hang a Dagster run forever),
bounded retries with backoff on 429 and 5xx, pagination of the version list (kfp returns
the first page only), and errors that name the repository, package, tag and URL.

kfp and Google libraries are imported on first use: the code location imports this module.
"""

from __future__ import annotations

import functools
import random
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

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

# The repository URL, exactly: kfp splits PROJECT/REPO with greedy regexes, so a URL with a
# package path (or a trailing segment) would silently address the wrong repository.
_REPOSITORY_URL = re.compile(
    r"^https://(?P<location>[a-z0-9-]+)-kfp\.pkg\.dev/(?P<project>[^/]+)/(?P<repository>[^/]+)$"
)
_UPLOAD_ANSWER = re.compile(r"^(?P<package>[^/\s]+)/(?P<version>sha256:[0-9a-f]{64})$")
# Google's guidance for its REST APIs: retry 429 (quota) and 5xx with exponential backoff.
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class ArtifactRegistryError(TemplateError):
    """A request Artifact Registry refused, failed or did not answer in time.

    ``status`` is the HTTP status when there was an answer, ``None`` for a timeout or a
    connection that could not be made.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


@dataclass(frozen=True)
class _HttpPolicy:
    timeout: float  # seconds, for connecting and for every read of the answer
    retries: int  # further attempts after a 429/5xx answer or a refused connection
    backoff: float  # seconds before the first retry; doubles each time, with jitter
    max_backoff: float

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:  # the server's own hint (seconds); an HTTP date is ignored
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass
        # Jitter keeps concurrent Dagster steps from retrying in lockstep.
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1)


class ArtifactRegistryTemplates(TemplateRegistry):
    """Templates in one Artifact Registry KFP repository.

    ``repository_url`` is ``https://REGION-kfp.pkg.dev/PROJECT/REPO``. ``auth`` defaults to
    Google's application default credentials; tests pass a ``requests`` auth (for example
    ``kfp.registry.ApiAuth``) or credentials of their own so that nothing calls Google, and
    a ``session`` whose transport reaches a local fake. A version's ``uri`` is what Vertex
    accepts as a job's ``template_uri``: ``REPOSITORY_URL/PACKAGE/sha256:HEX``.
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
        if not _REPOSITORY_URL.fullmatch(url):
            raise ValueError(
                f"not an Artifact Registry KFP repository URL: {repository_url!r} "
                "(expected https://REGION-kfp.pkg.dev/PROJECT/REPOSITORY)"
            )
        if timeout <= 0 or retries < 0 or not 1 <= page_size <= 1000:
            raise ValueError("timeout must be > 0, retries >= 0 and page_size in 1..1000")
        self.repository_url = url
        self.page_size = page_size  # Artifact Registry's documented maximum is 1,000
        self._policy = _HttpPolicy(timeout, retries, backoff, max_backoff)
        self._auth = auth
        self._session = session
        self._client_instance: Any = None
        self._client_lock = threading.Lock()

    @property
    def _client(self) -> Any:
        # Built on first use: building it imports kfp and, without ``auth``, looks up the
        # default Google credentials, neither of which loading the code location should do.
        with self._client_lock:
            if self._client_instance is None:
                self._client_instance = _registry_client_class()(
                    host=self.repository_url,
                    auth=self._auth,
                    policy=self._policy,
                    session=self._session,
                )
            return self._client_instance

    def upload(self, package: str, template: Path, tags: Sequence[str]) -> TemplateVersion:
        check_tags(package, tags)
        path = Path(template)
        expected = template_version_of(path.read_bytes())
        stored_package, version = self._client.upload_pipeline(str(path), tags=list(tags))
        # Artifact Registry names the package itself, after the pipeline's name in the
        # template; a job would otherwise run a template filed under another name.
        if stored_package != package:
            raise TemplateError(
                f"{path} was stored as template {stored_package!r} in {self.repository_url}, "
                f"not {package!r}: the package is named after the pipeline in the template"
            )
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
            found = self._client.get_tag(package, tag)
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
            items = list(self._client.pages("versions", package, self.page_size))
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
        with tempfile.TemporaryDirectory() as scratch:
            try:
                saved = self._client.download_pipeline(
                    version.package, version=version.version, file_name=f"{scratch}/template"
                )
            except ArtifactRegistryError as error:
                if error.status != 404:
                    raise
                raise self._no_version(version.package, version.version) from error
            content = Path(saved).read_bytes()
        actual = template_version_of(content)
        if actual != version.version:
            raise TemplateError(
                f"template {version.uri} does not match {version.version}: "
                f"what was downloaded is {actual}"
            )
        return content

    def _get_version(self, package: str, version: str) -> TemplateVersion:
        try:
            found = self._client.get_version(package, version)
        except ArtifactRegistryError as error:
            if error.status != 404:
                raise
            raise self._no_version(package, version) from error
        return self._version(package, found)

    def _version(self, package: str, item: dict[str, Any]) -> TemplateVersion:
        # ``relatedTags`` is only filled in the FULL view, which kfp asks for on AR hosts.
        version = _last_segment(item["name"])
        tags = sorted(_last_segment(tag["name"]) for tag in item.get("relatedTags", []))
        uri = f"{self.repository_url}/{package}/{version}"  # kfp's download_version_url
        return TemplateVersion(package, version, uri, tuple(tags))

    def _known_tags(self, package: str) -> str:
        try:
            tags = self._client.pages("tags", package, self.page_size)
            names = sorted(_last_segment(tag["name"]) for tag in tags)
        except ArtifactRegistryError as error:
            if error.status == 404:
                return "none"
            return f"not listed: {error}"  # keep the message about the missing tag first
        return ", ".join(names) or "none"

    def _no_version(self, package: str, version: str) -> TemplateError:
        return TemplateError(
            f"template {package!r} has no version {version} in {self.repository_url}"
        )


def _last_segment(resource_name: str) -> str:
    """``.../packages/P/versions/sha256:HEX`` -> ``sha256:HEX`` (AR may escape the colon)."""
    return unquote(resource_name.rsplit("/", 1)[-1])


def _timestamp(value: str | None) -> datetime:
    try:  # RFC 3339 with up to nanoseconds; fromisoformat truncates past microseconds
        return datetime.fromisoformat(value) if value else datetime.min.replace(tzinfo=UTC)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def _with_query(url: str, **params: str | int | None) -> str:
    """``url`` with ``params`` set in its query (kfp's list URLs already carry ``view=FULL``)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query += [(k, str(v)) for k, v in params.items() if v is not None]
    return urlunsplit(parts._replace(query=urlencode(query)))


@functools.cache
def _registry_client_class() -> type:
    """kfp's RegistryClient with every HTTP call sent through one timed, retried path.

    Defined on first use so that kfp is imported only then. Every RegistryClient method
    but ``upload_pipeline`` sends through ``_request``, so overriding that one method gives
    get_tag, get_version, list_* and download_pipeline the timeout and retries unchanged;
    ``upload_pipeline`` calls ``requests.post`` itself and is redone here on the same path,
    with the same URL, form fields and answer.
    """
    import google.auth.exceptions
    import requests
    from kfp.registry import RegistryClient

    class TimedRegistryClient(RegistryClient):
        def __init__(
            self,
            host: str,
            auth: Any,
            policy: _HttpPolicy,
            session: requests.Session | None,
        ) -> None:
            super().__init__(host=host, auth=auth)
            self._policy = policy
            self._session = session or requests.Session()

        def _request(
            self,
            request_url: str,
            request_body: str | None = "",
            http_request: str | None = None,
            extra_headers: dict | None = None,
        ) -> requests.Response:
            method = (http_request or "get").upper()
            return self.send(method, request_url, data=request_body, headers=extra_headers)

        def upload_pipeline(
            self,
            file_name: str,
            tags: str | list[str] | None = None,
            extra_headers: dict | None = None,
        ) -> tuple[str, str]:
            if isinstance(tags, str):
                tags = [tags]
            form = {"tags": ",".join(tags)} if tags else {}
            # Read into memory (templates are small) so that a retry can send it again.
            content = Path(file_name).read_bytes()
            url = self._config["upload_url"]
            response = self.send(
                "POST",
                url,
                data=form,
                files={"content": (Path(file_name).name, content)},
                headers=extra_headers,
            )
            answer = _UPLOAD_ANSWER.match(response.text.strip())
            if not answer:
                raise ArtifactRegistryError(
                    f"unexpected answer to POST {url}: {response.text[:200]!r} "
                    "(expected PACKAGE/sha256:HEX)",
                    url=url,
                    status=response.status_code,
                )
            return answer["package"], answer["version"]

        def pages(self, kind: str, package: str, page_size: int) -> Iterator[dict[str, Any]]:
            """Every version or tag of a package, following ``nextPageToken``.

            kfp's list_versions and list_tags return the first page only.
            """
            url = self._config[f"list_{kind}_url"].format(package_name=package)
            token, seen = None, set()
            while True:
                page_url = _with_query(url, pageSize=page_size, pageToken=token)
                body = self.json_body(self.send("GET", page_url), page_url)
                yield from body.get(kind, [])
                token = body.get("nextPageToken")
                if not token:
                    return
                if token in seen:  # a server bug must not become an endless loop
                    raise ArtifactRegistryError(
                        f"{page_url} returned a page token twice", url=page_url
                    )
                seen.add(token)

        @staticmethod
        def json_body(response: requests.Response, url: str) -> dict[str, Any]:
            try:
                body = response.json()
            except ValueError as error:
                raise ArtifactRegistryError(
                    f"{url} did not answer with JSON: {response.text[:200]!r}",
                    url=url,
                    status=response.status_code,
                ) from error
            if not isinstance(body, dict):
                raise ArtifactRegistryError(f"{url} answered {body!r}", url=url)
            return body

        def send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
            policy = self._policy
            attempts = policy.retries + 1
            for attempt in range(1, attempts + 1):
                try:
                    # kfp's own refresh: Google credentials get a new token when stale.
                    self._refresh_creds()
                except google.auth.exceptions.GoogleAuthError as error:
                    raise ArtifactRegistryError(
                        f"no Google credentials for {method} {url}: {error}", url=url
                    ) from error
                retry_after = None
                try:
                    response = self._session.request(
                        method, url, auth=self._get_auth(), timeout=policy.timeout, **kwargs
                    )
                except requests.Timeout as error:
                    # Not retried: the caller would wait attempts x timeout, and an upload
                    # that timed out may have been stored anyway.
                    raise ArtifactRegistryError(
                        f"Artifact Registry did not answer {method} {url} "
                        f"within {policy.timeout:g} s",
                        url=url,
                    ) from error
                except requests.ConnectionError as error:
                    if attempt == attempts:
                        raise ArtifactRegistryError(
                            f"could not reach Artifact Registry for {method} {url} "
                            f"({attempts} attempts): {error}",
                            url=url,
                        ) from error
                except requests.RequestException as error:
                    raise ArtifactRegistryError(
                        f"{method} {url} failed: {error}", url=url
                    ) from error
                else:
                    if response.ok:
                        return response
                    status = response.status_code
                    if status not in _RETRYABLE_STATUS or attempt == attempts:
                        tries = f" after {attempts} attempts" if status in _RETRYABLE_STATUS else ""
                        raise ArtifactRegistryError(
                            f"Artifact Registry answered {method} {url} with HTTP {status}"
                            f"{tries}: {_google_message(response)}",
                            url=url,
                            status=status,
                        )
                    retry_after = response.headers.get("Retry-After")
                    response.close()
                time.sleep(policy.delay(attempt, retry_after))
            raise AssertionError("unreachable")  # the last attempt returns or raises

    return TimedRegistryClient


def _google_message(response: requests.Response) -> str:
    """The ``error.message`` of a Google API error body, else the start of the body."""
    try:
        error = response.json().get("error", {})
        return f"{error.get('status', '')} {error['message']}".strip()
    except (ValueError, AttributeError, KeyError, TypeError):
        return response.text[:200].strip() or response.reason or "no details"
