"""Google credentials on ECS without keys, on the wire.

``FakeCloud`` is one local HTTP server that plays, each as documented:

- the ECS container credentials endpoint: ``GET`` the task role's path, answered with
  ``AccessKeyId``, ``SecretAccessKey``, ``Token``, ``Expiration`` and ``RoleArn``; new
  credentials on every read (ECS rotates them), an ``Authorization`` header required when
  reached through a full URI. ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` always means
  ``http://169.254.170.2``; the tests reach that address through ``HTTP_PROXY`` pointing here
  (the request line then carries the absolute URL), so the code's own URL is what is tested.
- Google STS (``token_url``): the token exchange form, with the subject token checked the
  way Google checks it with AWS: a signed ``GetCallerIdentity`` request for the configured
  audience, whose SigV4 signature is verified with botocore (an independent
  implementation) against the secret key the ECS endpoint issued with that access key id,
  unexpired, with the session token. The caller is then mapped as the pool's provider maps
  it (``attribute.aws_role``) and the attribute condition of deploy/gcp/README.md applied.
- IAM Credentials ``generateAccessToken`` (``service_account_impersonation_url``): only
  for a federated token STS issued, for the configured service account.
- a Google API (BigQuery's ``datasets.list``), which records the ``Authorization`` header a
  real client (google-cloud-bigquery) sends.

The last test runs dbt (``dbt debug --connection`` through ``start_dbt`` and dagster-dbt) on
the BigQuery emulator, behind a proxy that records the token dbt-bigquery sends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotocoreCredentials
from google.auth import aws, exceptions, identity_pool
from google.auth.transport.requests import Request
from google.cloud import bigquery

from ml_platform.resources import gcp_credentials as credentials_module
from ml_platform.resources.gcp_credentials import (
    CLOUD_PLATFORM_SCOPE,
    EcsTaskRoleCredentialsSupplier,
    ecs_aws_credentials,
    google_credentials,
)
from ml_platform.settings import EcsTaskRole, Settings, SettingsError
from tests.gcp.bigquery_emulator import FaultProxy, Tripwire, bq_emulator
from tests.gcp.loopback import LoopbackServer

__all__ = ["bq_emulator"]  # the session fixture, imported for pytest

ACCOUNT = "123456789012"
# A role name as CloudFormation generates it for CodeLocationTaskRole, and an ECS session
# name (the task id): the caller ARN is longer than google.subject's 127 bytes allow.
ROLE_NAME = "ml-platform-dagster-agent-CodeLocationTaskRole-AbCdEf123456"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/{ROLE_NAME}"
TASK_ID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
REGION = "eu-west-1"
ECS_PATH = "/v2/credentials/5f0c7a4e-2b1d-4a8e-9c3f-6d7e8f9a0b1c"
ECS_HOST = "169.254.170.2"
AUTHORIZATION_TOKEN = "container-authorization-token"
PROJECT = "acme-ml"
PROJECT_NUMBER = "987654321098"
POOL, PROVIDER = "ml-platform-aws", "ecs-code-location"
AUDIENCE = (
    f"//iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/"
    f"workloadIdentityPools/{POOL}/providers/{PROVIDER}"
)
SERVICE_ACCOUNT = f"ml-platform-dagster@{PROJECT}.iam.gserviceaccount.com"
# What the provider's attribute condition admits (deploy/gcp/README.md).
ADMITTED_ROLE = f"arn:aws:sts::{ACCOUNT}:assumed-role/{ROLE_NAME}"
IAM_SCOPE = "https://www.googleapis.com/auth/iam"

BRANCH = {
    "DAGSTER_CLOUD_DEPLOYMENT_NAME": "pr-7",
    "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT": "1",
    "DAGSTER_CLOUD_PULL_REQUEST_ID": "7",
    "ML_PLATFORM_GCP_PROJECT": PROJECT,
    "ML_PLATFORM_GCS_BUCKET": "acme-ml-pipelines",
    "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": "pipeline-templates",
}
AWS_VARIABLES = (
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Issued:
    """AWS credentials the ECS endpoint handed out (AWS knows their secret)."""

    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: datetime


@dataclass
class Exchange:
    """One token exchange at Google STS, as received."""

    form: dict[str, str]
    subject: dict[str, Any]  # the decoded subject token
    headers: dict[str, str]  # the signed request's headers, lowercased keys
    refused: str | None = None


@dataclass
class FakeCloud:
    credential_lifetime: timedelta = timedelta(hours=6)  # AWS credentials (ECS endpoint)
    federated_lifetime: timedelta = timedelta(hours=1)  # Google STS's token
    token_lifetime: timedelta = timedelta(hours=1)  # the service account's token
    ecs_failures: list[int] = field(default_factory=list)  # statuses for the next reads
    issued: list[Issued] = field(default_factory=list)
    ecs_reads: list[dict[str, str | None]] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)
    federated_tokens: list[str] = field(default_factory=list)
    impersonations: list[dict[str, Any]] = field(default_factory=list)
    service_account_tokens: list[str] = field(default_factory=list)
    api_calls: list[tuple[str, str | None]] = field(default_factory=list)
    _server: LoopbackServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url

    def credential_config(self, *, impersonate: bool = True) -> dict[str, Any]:
        """What `gcloud iam workload-identity-pools create-cred-config --aws` writes, with
        Google's endpoints pointed here."""
        config: dict[str, Any] = {
            "universe_domain": "googleapis.com",
            "type": "external_account",
            "audience": AUDIENCE,
            "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
            "token_url": f"{self.url}/v1/token",
            "credential_source": {
                "environment_id": "aws1",
                "region_url": "http://169.254.169.254/latest/meta-data/placement/availability-zone",
                "url": "http://169.254.169.254/latest/meta-data/iam/security-credentials",
                "regional_cred_verification_url": (
                    "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
                ),
            },
        }
        if impersonate:
            config["service_account_impersonation_url"] = (
                f"{self.url}/v1/projects/-/serviceAccounts/{SERVICE_ACCOUNT}:generateAccessToken"
            )
        return config

    # -- the parts -------------------------------------------------------------------------

    def ecs(self, authorization: str | None, proxied: bool) -> tuple[int, dict[str, Any] | str]:
        with self._lock:
            self.ecs_reads.append({"authorization": authorization, "proxied": str(proxied)})
            if self.ecs_failures:
                return self.ecs_failures.pop(0), "injected failure"
            # Through the full URI, the endpoint insists on its token (EKS Pod Identity and
            # the ECS agent's own full-URI endpoints do).
            if not proxied and authorization != AUTHORIZATION_TOKEN:
                return 401, "missing or wrong authorization token"
            issued = Issued(
                access_key_id="ASIA" + secrets.token_hex(8).upper(),
                secret_access_key=secrets.token_urlsafe(30),
                session_token=secrets.token_urlsafe(60),
                expiration=datetime.now(UTC) + self.credential_lifetime,
            )
            self.issued.append(issued)
        return 200, {
            "RoleArn": ROLE_ARN,
            "AccessKeyId": issued.access_key_id,
            "SecretAccessKey": issued.secret_access_key,
            "Token": issued.session_token,
            "Expiration": utc(issued.expiration),
        }

    def sts(self, body: str) -> tuple[int, dict[str, Any]]:
        form = dict(urllib.parse.parse_qsl(body))
        subject = json.loads(urllib.parse.unquote(form.get("subject_token", "null")))
        headers = {h["key"].lower(): h["value"] for h in (subject or {}).get("headers", [])}
        exchange = Exchange(form, subject, headers)
        exchange.refused = self._refusal(form, subject, headers)
        with self._lock:
            self.exchanges.append(exchange)
            if exchange.refused:
                return 400, {"error": "invalid_grant", "error_description": exchange.refused}
            token = f"federated-{len(self.federated_tokens) + 1}-{secrets.token_hex(4)}"
            self.federated_tokens.append(token)
        return 200, {
            "access_token": token,
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer",
            "expires_in": int(self.federated_lifetime.total_seconds()),
        }

    def _refusal(self, form, subject, headers) -> str | None:
        """Why Google STS would refuse this exchange, or None."""
        expected_form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "audience": AUDIENCE,
            "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
            "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        }
        for key, value in expected_form.items():
            if form.get(key) != value:
                return f"{key} is {form.get(key)!r}"
        # The federated token's scope: cloud-platform when it is used directly; iam when it
        # only serves to impersonate the service account (google-auth asks for that).
        if form.get("scope") not in (CLOUD_PLATFORM_SCOPE, IAM_SCOPE):
            return f"scope {form.get('scope')!r}"
        url = f"https://sts.{REGION}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
        if subject.get("url") != url or subject.get("method") != "POST":
            return f"not a GetCallerIdentity request: {subject.get('method')} {subject.get('url')}"
        if headers.get("x-goog-cloud-target-resource") != AUDIENCE:
            return "the signed request names another audience"
        authorization = headers.get("authorization", "")
        scheme, _, parameters = authorization.partition(" ")
        fields = dict(part.strip().split("=", 1) for part in parameters.split(","))
        access_key_id, date, region, service, _ = fields["Credential"].split("/")
        issued = next((i for i in self.issued if i.access_key_id == access_key_id), None)
        if scheme != "AWS4-HMAC-SHA256" or issued is None:
            return f"AWS does not know the access key {access_key_id}"
        if (date, region, service) != (headers.get("x-amz-date", "")[:8], REGION, "sts"):
            return f"signed for {service} in {region} on {date}"
        if headers.get("x-amz-security-token") != issued.session_token:
            return "the session token does not belong to the access key"
        if issued.expiration <= datetime.now(UTC):
            return "the AWS credentials have expired"
        signed_at = datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        if abs(datetime.now(UTC) - signed_at) > timedelta(minutes=15):
            return "the signature is too old"
        # What AWS STS does with the forwarded request: recompute the SigV4 signature.
        signed_headers = fields["SignedHeaders"].split(";")
        request = AWSRequest(
            method="POST",
            url=f"https://sts.{REGION}.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15",
            data=b"",
            headers={name: headers[name] for name in signed_headers},
        )
        request.context["timestamp"] = headers["x-amz-date"]
        signer = SigV4Auth(
            BotocoreCredentials(
                issued.access_key_id, issued.secret_access_key, issued.session_token
            ),
            "sts",
            REGION,
        )
        string_to_sign = signer.string_to_sign(request, signer.canonical_request(request))
        if signer.signature(string_to_sign, request) != fields["Signature"]:
            return "SignatureDoesNotMatch"
        # The caller, mapped as the provider maps it, and the attribute condition.
        caller = f"arn:aws:sts::{ACCOUNT}:assumed-role/{ROLE_NAME}/{TASK_ID}"
        aws_role = caller.rsplit("/", 1)[0]
        if aws_role != ADMITTED_ROLE:
            return f"the attribute condition rejects {aws_role}"
        return None

    def generate_access_token(
        self, email: str, authorization: str | None, body: str
    ) -> tuple[int, dict[str, Any]]:
        request = json.loads(body or "{}")
        with self._lock:
            self.impersonations.append(
                {"email": email, "authorization": authorization, "body": request}
            )
            if email != SERVICE_ACCOUNT:
                return 404, {"error": {"code": 404, "message": f"unknown {email}"}}
            federated = (authorization or "").removeprefix("Bearer ")
            if federated not in self.federated_tokens:
                return 401, {"error": {"code": 401, "message": "not a federated token"}}
            token = f"sa-token-{len(self.service_account_tokens) + 1}-{secrets.token_hex(4)}"
            self.service_account_tokens.append(token)
        expire = datetime.now(UTC) + self.token_lifetime
        return 200, {"accessToken": token, "expireTime": utc(expire)}

    def api(self, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.api_calls.append((path, authorization))
        return 200, {"kind": "bigquery#datasetList", "datasets": []}

    # -- the server ------------------------------------------------------------------------

    def __enter__(self) -> FakeCloud:
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                target = urllib.parse.urlsplit(self.path)
                authorization = self.headers.get("Authorization")
                # Through HTTP_PROXY the request line is the absolute URL (the relative URI's
                # link-local address); directly, it is a path.
                proxied = target.netloc == ECS_HOST
                if target.netloc and not proxied:
                    status, answer = 502, f"this proxy only reaches {ECS_HOST}"
                elif self.command == "GET" and target.path == ECS_PATH:
                    status, answer = cloud.ecs(authorization, proxied)
                elif self.command == "POST" and target.path == "/v1/token":
                    status, answer = cloud.sts(body)
                elif self.command == "POST" and target.path.endswith(":generateAccessToken"):
                    email = target.path.split("/serviceAccounts/")[1].split(":")[0]
                    status, answer = cloud.generate_access_token(email, authorization, body)
                elif target.path.startswith("/bigquery/v2/"):
                    status, answer = cloud.api(target.path, authorization)
                else:
                    status, answer = 404, f"nothing at {self.command} {self.path}"
                content = (json.dumps(answer) if isinstance(answer, dict) else answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = _handle

        self._server = LoopbackServer(Handler)
        return self

    def __exit__(self, *exc_info) -> None:
        assert self._server is not None
        self._server.close()


@pytest.fixture
def cloud() -> Iterator[FakeCloud]:
    with FakeCloud() as fake:
        yield fake


@pytest.fixture(autouse=True)
def tripwire(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tripwire]:
    """No AWS variables but the test's own, a new credentials cache for each test, and
    every HTTPS connection (a real Google or AWS endpoint) caught by a tripwire."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in ("ML_PLATFORM_GCP_CREDENTIAL_CONFIG", "ML_PLATFORM_BIGQUERY_API_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    wire = Tripwire()
    monkeypatch.setenv("HTTPS_PROXY", f"http://{wire.address}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    credentials_module._credentials.cache_clear()
    yield wire
    credentials_module._credentials.cache_clear()
    wire.close()


def only_boundary_lookups(wire: Tripwire) -> bool:
    """google-auth looks up the service account's Regional Access Boundary in the background
    after a token is used (iamcredentials.googleapis.com ...:allowedLocations); failing,
    it changes nothing. Any other way out of the machine would be a bug."""
    return all(
        attempt.startswith("CONNECT iamcredentials.googleapis.com:443") for attempt in wire.attempts
    )


def on_ecs(monkeypatch: pytest.MonkeyPatch, cloud: FakeCloud, how: str, **extra: str) -> Settings:
    """A branch deployment's settings in an ECS task, as ECS and dagster_cloud.yaml set it."""
    for name, value in {**BRANCH, **extra}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ML_PLATFORM_GCP_CREDENTIAL_CONFIG", json.dumps(cloud.credential_config()))
    monkeypatch.setenv("AWS_REGION", REGION)
    if how == "relative":
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", ECS_PATH)
        # The only way to 169.254.170.2 from here: through the fake, as an HTTP proxy.
        monkeypatch.setenv("HTTP_PROXY", cloud.url)
    else:
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{cloud.url}{ECS_PATH}")
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", AUTHORIZATION_TOKEN)
    return Settings.from_env()


def list_datasets(credentials, cloud: FakeCloud) -> None:
    """A real Google client's call, authenticated by ``credentials``."""
    client = bigquery.Client(
        project=PROJECT, credentials=credentials, client_options={"api_endpoint": cloud.url}
    )
    assert list(client.list_datasets(timeout=10)) == []


# -- the token chain -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["relative", "full"])
def test_a_google_client_on_ecs_sends_the_service_accounts_token(
    monkeypatch: pytest.MonkeyPatch, cloud: FakeCloud, tripwire: Tripwire, how: str
):
    settings = on_ecs(monkeypatch, cloud, how)
    credentials = google_credentials(settings)
    assert isinstance(credentials, aws.Credentials)
    assert google_credentials(settings) is credentials  # one object per process
    assert cloud.ecs_reads == []  # building them called nothing

    list_datasets(credentials, cloud)

    # 1. The task role's credentials, from the ECS endpoint: on the link-local address
    # without a token (relative URI), or with the authorization token (full URI).
    assert cloud.ecs_reads == [
        {
            "authorization": None if how == "relative" else AUTHORIZATION_TOKEN,
            "proxied": str(how == "relative"),
        }
    ]
    (issued,) = cloud.issued
    # 2. Google STS got a GetCallerIdentity request signed with them, for the audience
    # (the fake verified the signature with the issued secret key).
    (exchange,) = cloud.exchanges
    assert exchange.refused is None
    assert exchange.form["audience"] == AUDIENCE
    assert exchange.form["scope"] == IAM_SCOPE  # the federated token only impersonates
    assert exchange.headers["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={issued.access_key_id}/"
    )
    assert exchange.headers["x-amz-security-token"] == issued.session_token
    assert exchange.headers["x-goog-cloud-target-resource"] == AUDIENCE
    assert issued.secret_access_key not in json.dumps(exchange.subject)
    # 3. The federated token was exchanged for the service account's token...
    (impersonation,) = cloud.impersonations
    assert impersonation["authorization"] == f"Bearer {cloud.federated_tokens[0]}"
    assert impersonation["body"]["scope"] == [CLOUD_PLATFORM_SCOPE]
    # 4. ...which is what the client sent.
    (token,) = cloud.service_account_tokens
    assert cloud.api_calls == [(f"/bigquery/v2/projects/{PROJECT}/datasets", f"Bearer {token}")]
    assert credentials.token == token
    assert only_boundary_lookups(tripwire)


def test_a_refresh_before_expiry_reads_the_ecs_endpoint_again(
    monkeypatch: pytest.MonkeyPatch, cloud: FakeCloud
):
    # Google tokens within google-auth's refresh threshold (3 min 45 s) of expiry are
    # refreshed before use (the federated one, then the service account's); AWS credentials
    # within 5 minutes of theirs are re-read.
    cloud.token_lifetime = cloud.federated_lifetime = timedelta(minutes=3)
    cloud.credential_lifetime = timedelta(minutes=4)
    credentials = google_credentials(on_ecs(monkeypatch, cloud, "full"))

    list_datasets(credentials, cloud)
    list_datasets(credentials, cloud)

    assert len(cloud.ecs_reads) == 2
    first, second = cloud.issued
    assert [e.headers["x-amz-security-token"] for e in cloud.exchanges] == [
        first.session_token,
        second.session_token,
    ]
    assert [e.refused for e in cloud.exchanges] == [None, None]
    assert [authorization for _, authorization in cloud.api_calls] == [
        f"Bearer {token}" for token in cloud.service_account_tokens
    ]
    assert len(set(cloud.service_account_tokens)) == 2

    # AWS credentials far from expiry are cached: a new Google token, no new read.
    cloud.credential_lifetime = timedelta(hours=6)
    credentials.refresh(Request())
    credentials.refresh(Request())
    assert len(cloud.ecs_reads) == 3
    assert len(cloud.exchanges) == 4
    assert {e.headers["x-amz-security-token"] for e in cloud.exchanges[2:]} == {
        cloud.issued[2].session_token
    }


def test_without_impersonation_the_federated_token_is_used(
    monkeypatch: pytest.MonkeyPatch, cloud: FakeCloud
):
    settings = on_ecs(monkeypatch, cloud, "full")
    config = json.dumps(cloud.credential_config(impersonate=False))
    credentials = google_credentials(dataclasses.replace(settings, gcp_credential_config=config))
    list_datasets(credentials, cloud)
    assert cloud.impersonations == []
    assert cloud.exchanges[0].form["scope"] == CLOUD_PLATFORM_SCOPE
    assert cloud.api_calls[0][1] == f"Bearer {cloud.federated_tokens[0]}"


# -- errors ------------------------------------------------------------------------------


def test_no_task_role_endpoint_on_ecs_is_refused_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch, cloud: FakeCloud
):
    settings = on_ecs(monkeypatch, cloud, "full")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    settings = Settings.from_env()
    with pytest.raises(SettingsError) as raised:
        google_credentials(settings)
    message = str(raised.value)
    assert "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI" in message
    assert "AWS_CONTAINER_CREDENTIALS_FULL_URI" in message
    assert "task_role_arn" in message

    # Building the resources (what loading the code location does) fails the same way.
    from ml_platform.resources.backends import build_resources

    with pytest.raises(SettingsError, match="AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        build_resources(settings)


def test_no_region_is_refused_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch, cloud: FakeCloud
):
    on_ecs(monkeypatch, cloud, "relative")
    monkeypatch.delenv("AWS_REGION")
    with pytest.raises(SettingsError, match="AWS_REGION nor AWS_DEFAULT_REGION"):
        google_credentials(Settings.from_env())
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    assert isinstance(google_credentials(Settings.from_env()), aws.Credentials)


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/creds", "http://example.com/creds", "ftp://127.0.0.1/c"],
)
def test_a_full_uri_may_not_send_the_token_in_clear_to_anyone(url: str):
    with pytest.raises(SettingsError, match="AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        EcsTaskRoleCredentialsSupplier(EcsTaskRole(credentials_full_uri=url, region=REGION))
    for allowed in ("https://creds.example.com/x", "http://127.0.0.1:9/x", "http://[::1]/x"):
        EcsTaskRoleCredentialsSupplier(EcsTaskRole(credentials_full_uri=allowed, region=REGION))
    relative = EcsTaskRole(credentials_relative_uri="/v2/x", credentials_full_uri=url, region="r")
    assert EcsTaskRoleCredentialsSupplier(relative).url == "http://169.254.170.2/v2/x"


def test_a_wrong_authorization_token_fails_at_once_with_the_endpoints_answer(
    monkeypatch: pytest.MonkeyPatch, cloud: FakeCloud
):
    on_ecs(monkeypatch, cloud, "full")
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "stale")
    credentials = google_credentials(Settings.from_env())
    with pytest.raises(exceptions.RefreshError) as raised:
        credentials.refresh(Request())
    assert "ECS task role's credentials" in str(raised.value)
    assert "HTTP 401" in str(raised.value)
    assert "stale" not in str(raised.value)
    assert len(cloud.ecs_reads) == 1  # a 401 is not retried
    assert cloud.exchanges == []


def test_an_unavailable_endpoint_is_retried(monkeypatch: pytest.MonkeyPatch, cloud: FakeCloud):
    # Short lifetimes: every refresh goes back to STS, and so to the ECS endpoint.
    cloud.federated_lifetime = timedelta(minutes=3)
    cloud.credential_lifetime = timedelta(minutes=4)
    settings = on_ecs(monkeypatch, cloud, "full")
    supplier = EcsTaskRoleCredentialsSupplier(settings.ecs_task_role, backoff=0.01)
    credentials = ecs_aws_credentials(settings.gcp_credential_info, supplier)

    cloud.ecs_failures = [503, 500]
    credentials.refresh(Request())
    assert len(cloud.ecs_reads) == 3
    assert cloud.exchanges[-1].refused is None

    cloud.ecs_failures = [503, 503, 503]
    with pytest.raises(exceptions.RefreshError, match="HTTP 503") as raised:
        credentials.refresh(Request())
    assert raised.value.retryable
    assert len(cloud.ecs_reads) == 6


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "service_account", "private_key": "k"}', "Service account keys"),
        ('{"type": "external_account", "audience": "a"}', "lacks subject_token_type"),
        ("/nonexistent/credential-config.json", "No such file or directory"),
        ("ya29.not-a-path-and-not-json", "neither a JSON credential configuration"),
    ],
)
def test_a_bad_configuration_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
):
    for name, setting in BRANCH.items():
        monkeypatch.setenv(name, setting)
    monkeypatch.setenv("ML_PLATFORM_GCP_CREDENTIAL_CONFIG", value)
    with pytest.raises(SettingsError, match="ML_PLATFORM_GCP_CREDENTIAL_CONFIG") as raised:
        Settings.from_env()
    assert message in str(raised.value)
    assert "private_key" not in str(raised.value)
    assert "ya29" not in str(raised.value)  # what is not a path is not repeated


def test_the_configuration_may_be_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for name, setting in BRANCH.items():
        monkeypatch.setenv(name, setting)
    path = tmp_path / "credential-config.json"
    path.write_text('["external_account"]')
    monkeypatch.setenv("ML_PLATFORM_GCP_CREDENTIAL_CONFIG", str(path))
    with pytest.raises(SettingsError, match="got type 'list'"):
        Settings.from_env()
    config = {"type": "external_account", "audience": AUDIENCE, "subject_token_type": "t"}
    path.write_text(json.dumps(config))
    assert Settings.from_env().gcp_credential_info == config


# -- elsewhere than ECS ------------------------------------------------------------------


def test_without_a_configuration_clients_use_application_default_credentials(
    monkeypatch: pytest.MonkeyPatch,
):
    for name, value in BRANCH.items():
        monkeypatch.setenv(name, value)
    assert google_credentials(Settings.from_env()) is None


def test_off_ecs_the_configuration_is_loaded_as_google_auth_would(tmp_path: Path, cloud: FakeCloud):
    # A developer's machine (local deployment) with an AWS-sourced configuration: google-auth's
    # own AWS source (access-key variables, EC2 metadata), not the ECS supplier.
    config = json.dumps(cloud.credential_config())
    credentials = google_credentials(
        Settings.from_env({"ML_PLATFORM_GCP_CREDENTIAL_CONFIG": config})
    )
    assert isinstance(credentials, aws.Credentials)
    assert not isinstance(
        credentials._aws_security_credentials_supplier, EcsTaskRoleCredentialsSupplier
    )
    # A file-sourced configuration (as CI writes for GitHub's OIDC token), given as a path.
    token_file = tmp_path / "oidc-token"
    path = tmp_path / "github.json"
    path.write_text(
        json.dumps(
            {
                "type": "external_account",
                "audience": AUDIENCE.replace(PROVIDER, "github"),
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": f"{cloud.url}/v1/token",
                "credential_source": {"file": str(token_file)},
            }
        )
    )
    settings = Settings.from_env({**BRANCH, "ML_PLATFORM_GCP_CREDENTIAL_CONFIG": str(path)})
    assert isinstance(google_credentials(settings), identity_pool.Credentials)
    assert cloud.ecs_reads == cloud.exchanges == []


# -- the resources -------------------------------------------------------------------------


def test_every_google_client_gets_the_same_credentials(
    monkeypatch: pytest.MonkeyPatch, cloud: FakeCloud
):
    from ml_platform.resources.backends import build_resources

    settings = on_ecs(monkeypatch, cloud, "full")
    credentials = google_credentials(settings)
    resources = build_resources(settings)
    assert resources["warehouse"]._credentials is credentials
    assert resources["pipeline_runner"].credentials is credentials
    assert resources["artifacts"].credentials is credentials
    assert resources["templates"]._auth is credentials
    assert cloud.ecs_reads == []  # building resources calls nothing

    # A plain-HTTP endpoint (an emulator) never gets the real token: the resource goes
    # anonymous there.
    monkeypatch.setenv("ML_PLATFORM_BIGQUERY_API_ENDPOINT", "http://127.0.0.1:9050")
    monkeypatch.setenv("ML_PLATFORM_VERTEX_API_ENDPOINT", "http://127.0.0.1:9051")
    resources = build_resources(Settings.from_env())
    assert resources["warehouse"]._credentials is None
    assert resources["pipeline_runner"].credentials is None
    assert resources["artifacts"].credentials is credentials


# -- dbt ---------------------------------------------------------------------------------


def test_dbt_gets_a_fresh_token_in_its_environment_only(
    monkeypatch: pytest.MonkeyPatch, cloud: FakeCloud, bq_emulator, tmp_path: Path
):
    from ml_platform.assets.dbt import start_dbt
    from ml_platform.resources.backends import build_resources
    from ml_platform.resources.gcp_credentials import (
        DBT_ACCESS_TOKEN_TARGET,
        DBT_ACCESS_TOKEN_VARIABLE,
    )
    from tests.gcp.bigquery_emulator import PROJECT as EMULATOR_PROJECT

    with FaultProxy(bq_emulator.endpoint) as proxy:  # no faults: it records what dbt sends
        settings = on_ecs(
            monkeypatch,
            cloud,
            "full",
            ML_PLATFORM_GCP_PROJECT=EMULATOR_PROJECT,
            ML_PLATFORM_BIGQUERY_API_ENDPOINT=proxy.endpoint,
        )
        monkeypatch.setenv("DBT_TARGET_PATH", str(tmp_path / "target"))
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        dbt = build_resources(settings)["dbt"]
        assert dbt.target == DBT_ACCESS_TOKEN_TARGET
        # What the dbt assets run, with the command that tests the profile's connection.
        args = ["debug", "--connection", "--vars", json.dumps(settings.dbt_vars)]
        invocation = start_dbt(dbt, args, settings=settings)
        assert DBT_ACCESS_TOKEN_VARIABLE not in os.environ  # set for the start only
        invocation.wait()

    (token,) = cloud.service_account_tokens  # minted for this dbt command
    assert proxy.authorizations, "dbt sent nothing to BigQuery"
    assert set(proxy.authorizations) == {f"Bearer {token}"}
    assert token not in " ".join(invocation.process.args)
    written = [p for p in (tmp_path / "target").rglob("*") if p.is_file()]
    assert written, "dbt wrote no logs"
    assert not [p for p in written if token in p.read_text(errors="replace")]
