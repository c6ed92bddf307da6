"""Google credentials for the Google Cloud deployments, without service account keys.

``google_credentials(settings)`` returns ``None`` unless ``ML_PLATFORM_GCP_CREDENTIAL_CONFIG``
holds a workload identity federation credential configuration; ``None`` means Application
Default Credentials (gcloud's login on a developer's machine, the attached service account on
Google Cloud, ``GOOGLE_APPLICATION_CREDENTIALS`` in CI).

With a configuration, on the Dagster+ ECS agent: the configuration is AWS-sourced (its subject
token is a signed AWS ``GetCallerIdentity`` request). google-auth's own AWS source reads only
``AWS_ACCESS_KEY_ID``-style variables or the EC2 metadata service, and an ECS Fargate task has
neither: its task role's credentials come from the ECS container credentials endpoint. So
the credentials are google-auth's ``aws.Credentials`` with ``EcsTaskRoleCredentialsSupplier``,
the custom ``AwsSecurityCredentialsSupplier`` google-auth offers for this (the maintainers'
answer in googleapis/google-auth-library-python#1556). google-auth then signs the request with
the task role's credentials, exchanges it at Google STS for a federated token and, when the
configuration names a service account, exchanges that for the service account's access token.

One credentials object per process (cached here) is handed to every Google client
(``backends.py``), so the token is fetched once and refreshed by google-auth shortly before
it expires; dbt gets an access token minted from the same object (``assets/dbt.py``).

Nothing here calls a Google or AWS endpoint until a client first needs a token. google-auth
is imported only when credentials are built (branch and prod deployments with a
configuration): the code location imports this module in every deployment.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ml_platform.resources.retries import Backoff, RetryDeadlineError, call, is_transient
from ml_platform.settings import (
    GCP_CREDENTIAL_CONFIG_VARIABLE,
    Deployment,
    EcsTaskRole,
    Settings,
    SettingsError,
)

if TYPE_CHECKING:
    from google.auth.aws import AwsSecurityCredentials
    from google.auth.credentials import Credentials
    from google.auth.transport import Request

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# The subject_token_type of an AWS-sourced credential configuration.
AWS_SUBJECT_TOKEN_TYPE = "urn:ietf:params:aws:token-type:aws4_request"
# ECS serves AWS_CONTAINER_CREDENTIALS_RELATIVE_URI on this address, over plain HTTP.
ECS_CREDENTIALS_HOST = "169.254.170.2"
# A full URI over plain HTTP may only name these hosts or a loopback address (the AWS SDKs'
# rule): the request carries an authorization token and returns credentials.
_LINK_LOCAL_CREDENTIALS_HOSTS = frozenset(
    {ipaddress.ip_address("169.254.170.2"), ipaddress.ip_address("169.254.170.23"),
     ipaddress.ip_address("fd00:ec2::23")}
)  # fmt: skip
# The ECS endpoint's answer fields (the same as the EC2 metadata service's).
_REQUIRED_FIELDS = ("AccessKeyId", "SecretAccessKey")

# dbt-bigquery runs as a subprocess and builds its own credentials, so it cannot use these.
# With a credential configuration, dbt runs with this target of dbt_project/profiles.yml
# (BigQuery, `oauth-secrets`), and each dbt command gets an access token minted from the
# code location's credentials in this variable of its own environment (assets/dbt.py). dbt
# masks the values of DBT_ENV_SECRET_* variables in its logs.
DBT_ACCESS_TOKEN_TARGET = "access_token"
DBT_ACCESS_TOKEN_VARIABLE = "DBT_ENV_SECRET_GOOGLE_ACCESS_TOKEN"


def google_credentials(settings: Settings) -> Credentials | None:
    """The Google credentials of this process, or None for Application Default Credentials.

    Building them calls nothing; a configuration that cannot work here is refused at once
    with a ``SettingsError`` that names the variable to fix.
    """
    if settings.gcp_credential_config is None:
        return None
    return _credentials(
        settings.gcp_credential_config,
        settings.ecs_task_role,
        # Branch and prod deployments run on the ECS agent: there, an AWS-sourced
        # configuration without the task role's endpoint is a misconfigured task, not a
        # cue to probe the EC2 metadata service (which Fargate does not have).
        on_ecs=settings.deployment is not Deployment.LOCAL,
    )


@cache
def _credentials(config: str, task_role: EcsTaskRole, *, on_ecs: bool) -> Credentials:
    info: dict[str, Any] = json.loads(config)  # validated by Settings
    aws_sourced = info.get("subject_token_type") == AWS_SUBJECT_TOKEN_TYPE
    if aws_sourced and (task_role.serves_credentials or on_ecs):
        return ecs_aws_credentials(info, EcsTaskRoleCredentialsSupplier(task_role))
    # Anywhere else, what google-auth would build from the same file as Application Default
    # Credentials: AWS from access-key variables or EC2 metadata, a file or URL (identity
    # pool, e.g. GitHub's OIDC token), or an executable (pluggable). Not
    # google.auth.load_credentials_from_dict: it also looks up the pool's project id, which
    # calls Google at load, and warns about generic loaders.
    from google.auth import aws, identity_pool, pluggable

    source = info.get("credential_source") or {}
    if aws_sourced:
        kind: Any = aws.Credentials
    elif isinstance(source, dict) and source.get("executable") is not None:
        kind = pluggable.Credentials
    else:
        kind = identity_pool.Credentials
    try:
        return kind.from_info(info, scopes=[CLOUD_PLATFORM_SCOPE])
    except ValueError as error:  # google-auth's InvalidValue/InvalidResource are ValueErrors
        raise SettingsError(
            f"{GCP_CREDENTIAL_CONFIG_VARIABLE}: google-auth refused the configuration: {error}"
        ) from error


def ecs_aws_credentials(
    info: dict[str, Any], supplier: EcsTaskRoleCredentialsSupplier
) -> Credentials:
    """google-auth's AWS credentials for an AWS-sourced configuration, with the credentials
    and region coming from ``supplier`` instead of the configuration's ``credential_source``.

    google-auth takes one or the other, never both, so the source is dropped. With a
    supplier, google-auth signs for ``https://sts.{region}.amazonaws.com`` (its default
    regional verification URL, the one gcloud writes too). Everything else (audience, STS
    URL, service account impersonation and its token lifetime) comes from the configuration.
    """
    from google.auth import aws

    aws.AwsSecurityCredentialsSupplier.register(EcsTaskRoleCredentialsSupplier)
    without_source = {key: value for key, value in info.items() if key != "credential_source"}
    try:
        return aws.Credentials.from_info(
            without_source,
            aws_security_credentials_supplier=supplier,
            scopes=[CLOUD_PLATFORM_SCOPE],
        )
    except ValueError as error:
        raise SettingsError(
            f"{GCP_CREDENTIAL_CONFIG_VARIABLE}: google-auth refused the configuration: {error}"
        ) from error


def credentials_url(task_role: EcsTaskRole) -> str:
    """The URL of the task role's credentials, by the AWS SDKs' rules: the relative URI (on
    ECS's link-local address) wins over a full URI; a full URI over plain HTTP must name a
    loopback or ECS/EKS link-local host."""
    if task_role.credentials_relative_uri:
        path = task_role.credentials_relative_uri
        if not path.startswith("/"):
            raise SettingsError(
                f"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI must be a path starting with '/', "
                f"got {path!r}"
            )
        return f"http://{ECS_CREDENTIALS_HOST}{path}"
    if task_role.credentials_full_uri:
        url = task_role.credentials_full_uri
        parts = urlsplit(url)
        if parts.scheme == "https" and parts.hostname:
            return url
        if parts.scheme == "http" and _is_allowed_http_host(parts.hostname):
            return url
        raise SettingsError(
            f"AWS_CONTAINER_CREDENTIALS_FULL_URI must be an https:// URL, or an http:// URL "
            f"of a loopback or ECS/EKS link-local address; got {url!r}"
        )
    raise SettingsError(
        f"{GCP_CREDENTIAL_CONFIG_VARIABLE} is AWS-sourced, but this task has no AWS task role "
        "credentials: neither AWS_CONTAINER_CREDENTIALS_RELATIVE_URI nor "
        "AWS_CONTAINER_CREDENTIALS_FULL_URI is set. ECS sets the first in every task whose "
        "task definition has a task role: check task_role_arn in dagster_cloud.yaml's "
        "container_context.ecs (CloudFormation output CodeLocationTaskRoleArn)"
    )


def _is_allowed_http_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address in _LINK_LOCAL_CREDENTIALS_HOSTS


class EcsTaskRoleCredentialsSupplier:
    """The ECS task role's credentials for google-auth's AWS credentials.

    Implements ``google.auth.aws.AwsSecurityCredentialsSupplier`` (registered as a virtual
    subclass when credentials are built, so that this module imports no google-auth).
    google-auth asks for credentials on every token exchange and does not cache them, so
    they are cached here until ``refresh_margin`` before their ``Expiration``: the signed
    request is checked by AWS STS moments after it is made, and must not be signed with
    credentials about to expire. ECS rotates a task role's credentials well before they
    expire, so a re-read always gets fresh ones.

    The endpoint is read with the ``request`` google-auth passes in (its own HTTP stack),
    with a timeout, a few attempts on connection errors, 429 and 5xx (the ECS agent may be
    briefly unavailable), and a ``RefreshError`` that says what failed.
    """

    def __init__(
        self,
        task_role: EcsTaskRole,
        *,
        refresh_margin: timedelta = timedelta(minutes=5),
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.url = credentials_url(task_role)
        if not task_role.region:
            raise SettingsError(
                "the AWS region is unknown: neither AWS_REGION nor AWS_DEFAULT_REGION is set "
                "(ECS sets AWS_REGION in Fargate tasks; otherwise add it to dagster_cloud.yaml's "
                "container_context.ecs.env_vars). It names the AWS STS endpoint Google checks "
                "the task role's identity with"
            )
        self.region = task_role.region
        self._task_role = task_role
        self.refresh_margin = refresh_margin
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self._lock = threading.Lock()
        self._cached: AwsSecurityCredentials | None = None
        self._expiration: datetime | None = None

    def __repr__(self) -> str:
        return f"EcsTaskRoleCredentialsSupplier({self.url!r}, region={self.region!r})"

    # google-auth's credentials pickle (and copy) themselves without their locks; so does
    # this, and a copy starts with an empty cache.
    def __getstate__(self) -> dict[str, Any]:
        state = {**self.__dict__, "_cached": None, "_expiration": None}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- google.auth.aws.AwsSecurityCredentialsSupplier ------------------------------------

    def get_aws_region(self, context: Any, request: Request) -> str:
        return self.region

    def get_aws_security_credentials(self, context: Any, request: Request) -> Any:
        with self._lock:  # one read of the endpoint at a time, whoever refreshes
            if self._cached is not None and self._fresh():
                return self._cached
            self._cached, self._expiration = self._fetch(request)
            return self._cached

    # -- the endpoint --------------------------------------------------------------------

    @property
    def expiration(self) -> datetime | None:
        """When the cached credentials expire (None: nothing cached, or no Expiration)."""
        return self._expiration

    def _fresh(self) -> bool:
        # Without an Expiration the answer cannot be cached safely: read it every time.
        return (
            self._expiration is not None
            and datetime.now(UTC) < self._expiration - self.refresh_margin
        )

    def _fetch(self, request: Request) -> tuple[AwsSecurityCredentials, datetime | None]:
        from google.auth import exceptions

        headers = {"Accept": "application/json"}
        token = self._authorization_token()
        if token:
            headers["Authorization"] = token

        def read() -> str:
            response = request(url=self.url, method="GET", headers=headers, timeout=self.timeout)
            body = response.data.decode("utf-8", "replace")
            if response.status != 200:
                # Never the body of a 200 (credentials); an error answer is safe to show.
                raise _EndpointError(response.status, body[:200])
            return body

        backoff = Backoff(
            initial=self.backoff, maximum=8 * self.backoff, deadline=60.0, retries=self.attempts - 1
        )
        try:
            # Retried: connection errors, 429 and 5xx (the ECS agent may be briefly
            # unavailable); not a 401/403, e.g. a wrong authorization token.
            return self._parse(call(read, transient=is_transient, backoff=backoff))
        except (_EndpointError, exceptions.TransportError, RetryDeadlineError) as error:
            last = error.cause if isinstance(error, RetryDeadlineError) else error
            failure = (
                str(last) if isinstance(last, _EndpointError) else f"{type(last).__name__}: {last}"
            )
            raise exceptions.RefreshError(
                f"could not read the ECS task role's credentials from {self.url}: {failure}",
                retryable=is_transient(last),
            ) from error

    def _authorization_token(self) -> str | None:
        from google.auth import exceptions

        token = self._task_role.authorization_token
        if not token and self._task_role.authorization_token_file:
            # Read on every fetch: EKS Pod Identity rotates the file's token.
            path = Path(self._task_role.authorization_token_file)
            try:
                token = path.read_text().strip()
            except OSError as error:
                raise exceptions.RefreshError(
                    f"cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {path}: {error}"
                ) from error
        if token and any(character in token for character in "\r\n"):
            raise exceptions.RefreshError(
                "the ECS authorization token contains a line break: refusing to send it"
            )
        return token or None

    def _parse(self, body: str) -> tuple[AwsSecurityCredentials, datetime | None]:
        from google.auth import aws, exceptions

        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise exceptions.RefreshError(f"{self.url} did not answer with a JSON object")
        missing = [name for name in _REQUIRED_FIELDS if not answer.get(name)]
        if missing:
            raise exceptions.RefreshError(f"{self.url} answered without {', '.join(missing)}")
        expiration = None
        if answer.get("Expiration"):
            try:
                expiration = datetime.fromisoformat(answer["Expiration"])
            except (TypeError, ValueError) as error:
                raise exceptions.RefreshError(
                    f"{self.url} answered an unreadable Expiration {answer['Expiration']!r}"
                ) from error
            if expiration.tzinfo is None:  # the endpoint's times are UTC
                expiration = expiration.replace(tzinfo=UTC)
        credentials = aws.AwsSecurityCredentials(
            access_key_id=answer["AccessKeyId"],
            secret_access_key=answer["SecretAccessKey"],
            session_token=answer.get("Token") or None,
        )
        return credentials, expiration


def dbt_uses_access_token(settings: Settings) -> bool:
    """Whether dbt authenticates with a token minted by the code location (branch and prod
    with a credential configuration) rather than with Application Default Credentials."""
    return not settings.is_local and settings.gcp_credential_config is not None


def fresh_access_token(credentials: Credentials) -> tuple[str, datetime | None]:
    """A newly minted access token of ``credentials`` and its expiry (UTC), for a subprocess
    that cannot refresh it (dbt). Minted now rather than taken from the cache, so that the
    subprocess gets the token's whole lifetime; the shared credentials keep the new token."""
    from google.auth.transport.requests import Request

    credentials.refresh(Request())
    expiry = credentials.expiry  # google-auth keeps naive UTC datetimes
    return credentials.token, expiry.replace(tzinfo=UTC) if expiry else None


class _EndpointError(Exception):
    """An error answer of the ECS credentials endpoint."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
