"""ArtifactRegistryTemplates over the wire, against a local fake of Artifact Registry's KFP
repository (tests/gcp/fake_artifact_registry.py), which stands in for Google only. The
client builds the same URLs it builds in production."""

import hashlib
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import google.auth
import pytest
import requests
from google.auth import credentials as google_credentials
from google.oauth2 import credentials as oauth2_credentials
from kfp.registry import ApiAuth

from ml_platform.pipelines import TRAINING_PIPELINE
from ml_platform.resources.templates import TemplateError, TemplateVersion
from ml_platform.resources.templates.artifact_registry import (
    ArtifactRegistryError,
    ArtifactRegistryTemplates,
)
from tests.gcp.fake_artifact_registry import API_HOST, FakeArtifactRegistry

PACKAGE = "flight-delay-training"
REPOSITORY_ROOT = Path(__file__).parents[2]


@pytest.fixture
def fake():
    with FakeArtifactRegistry() as server:
        yield server


def registry(fake: FakeArtifactRegistry, **options) -> ArtifactRegistryTemplates:
    options = {"timeout": 5.0, "backoff": 0.01, **options}
    return ArtifactRegistryTemplates(
        fake.repository_url, auth=ApiAuth("test-token"), session=fake.session(), **options
    )


def template(tmp_path: Path, text: str, pipeline: str = PACKAGE) -> Path:
    content = f"pipelineInfo:\n  name: {pipeline}\nroot:\n  text: {text!r}\n"
    path = tmp_path / f"{hashlib.md5(content.encode()).hexdigest()}.yaml"
    path.write_text(content)
    return path


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_upload_with_tags_resolves_to_the_content_version(fake, tmp_path):
    templates = registry(fake)
    source = template(tmp_path, "a")
    uploaded = templates.upload(PACKAGE, source, ["v1", "latest"])

    version = sha256_of(source)
    assert uploaded == TemplateVersion(
        PACKAGE, version, f"{fake.repository_url}/{PACKAGE}/{version}", ("latest", "v1")
    )
    assert uploaded.uri.startswith("https://us-central1-kfp.pkg.dev/acme-ml/pipeline-templates/")
    assert templates.resolve(PACKAGE, "latest") == uploaded
    assert templates.fetch(uploaded) == source.read_bytes()

    upload = fake.requests_to("/acme-ml/pipeline-templates", method="POST")
    assert [r.url for r in upload] == [fake.repository_url]
    assert b'name="tags"' in upload[0].body and b"v1,latest" in upload[0].body
    # The tag is read from the Artifact Registry API, the version by its sha256.
    tag_reads = fake.requests_to(f"/packages/{PACKAGE}/tags/latest")
    assert [r.host for r in tag_reads] == [API_HOST]
    assert fake.requests_to(f"/{PACKAGE}/{version}")[0].host == "us-central1-kfp.pkg.dev"
    assert {r.headers["authorization"] for r in fake.requests} == {"Bearer test-token"}


def test_a_second_upload_moves_the_tag_and_keeps_the_others(fake, tmp_path):
    templates = registry(fake)
    first = templates.upload(PACKAGE, template(tmp_path, "a"), ["v1", "latest"])
    second = templates.upload(PACKAGE, template(tmp_path, "b"), ["latest"])

    assert second.version != first.version
    assert templates.resolve(PACKAGE, "latest") == second
    assert templates.resolve(PACKAGE, "v1").version == first.version
    assert templates.resolve(PACKAGE, "v1").tags == ("v1",)
    # The same content again is the same version; its tags are all of the version's tags.
    again = templates.upload(PACKAGE, template(tmp_path, "a"), ["v2"])
    assert (again.version, again.tags) == (first.version, ("v1", "v2"))


def test_an_explicit_version_resolves_without_a_tag(fake, tmp_path):
    templates = registry(fake)
    uploaded = templates.upload(PACKAGE, template(tmp_path, "a"), ["latest"])
    assert templates.resolve(PACKAGE, uploaded.version) == uploaded
    assert not fake.requests_to("/tags/")

    unknown = "sha256:" + "0" * 64
    with pytest.raises(
        TemplateError, match=re.escape(f"no version {unknown} in {fake.repository_url}")
    ):
        templates.resolve(PACKAGE, unknown)


def test_list_versions_follows_page_tokens(fake, tmp_path):
    templates = registry(fake, page_size=2)
    uploaded = [templates.upload(PACKAGE, template(tmp_path, str(i)), [f"v{i}"]) for i in range(5)]

    listed = templates.list_versions(PACKAGE)

    assert [v.version for v in listed] == [v.version for v in reversed(uploaded)]  # newest first
    assert [v.tags for v in listed] == [(f"v{i}",) for i in reversed(range(5))]
    pages = [r for r in fake.requests if r.path.endswith(f"/packages/{PACKAGE}/versions")]
    assert len(pages) == 3
    assert all(p.query["pageSize"] == "2" and p.query["view"] == "FULL" for p in pages)
    assert "pageToken" not in pages[0].query
    assert (
        pages[1].query["pageToken"] and pages[2].query["pageToken"] != pages[1].query["pageToken"]
    )
    assert templates.list_versions("no-such-template") == []


def test_fetch_checks_the_downloaded_content_against_its_version(fake, tmp_path):
    templates = registry(fake)
    uploaded = templates.upload(PACKAGE, template(tmp_path, "a"), ["latest"])
    fake.tamper(PACKAGE, uploaded.version, b"pipelineInfo: {name: something-else}\n")
    with pytest.raises(TemplateError, match=re.escape(f"template {uploaded.uri} does not match")):
        templates.fetch(uploaded)


def test_an_unknown_tag_names_the_repository_package_and_tag(fake, tmp_path):
    templates = registry(fake)
    with pytest.raises(TemplateError) as missing_package:
        templates.resolve(PACKAGE, "latest")
    assert str(missing_package.value) == (
        f"template {PACKAGE!r} has no tag 'latest' in {fake.repository_url} (tags: none)"
    )
    templates.upload(PACKAGE, template(tmp_path, "a"), ["v1", "v2"])
    with pytest.raises(TemplateError, match=r"has no tag 'prod' in .* \(tags: v1, v2\)$"):
        templates.resolve(PACKAGE, "prod")


def test_503_answers_are_retried_then_succeed(fake, tmp_path):
    templates = registry(fake)
    uploaded = templates.upload(PACKAGE, template(tmp_path, "a"), ["latest"])
    fake.fail(503, times=2, path_contains="/tags/latest")
    assert templates.resolve(PACKAGE, "latest") == uploaded
    assert len(fake.requests_to("/tags/latest")) == 3


def test_an_upload_answered_with_429_is_sent_again(fake, tmp_path):
    templates = registry(fake)
    source = template(tmp_path, "a")
    fake.fail(429, path_contains="/pipeline-templates", retry_after="0")
    assert templates.upload(PACKAGE, source, ["latest"]).version == sha256_of(source)
    posts = fake.requests_to("/pipeline-templates", method="POST")
    assert len(posts) == 2 and all(source.read_bytes() in post.body for post in posts)


def test_a_dropped_connection_is_retried(fake, tmp_path):
    templates = registry(fake)
    uploaded = templates.upload(PACKAGE, template(tmp_path, "a"), ["latest"])
    fake.drop(path_contains="/tags/latest")
    assert templates.resolve(PACKAGE, "latest") == uploaded
    assert len(fake.requests_to("/tags/latest")) == 2


def test_retries_are_bounded(fake, tmp_path):
    templates = registry(fake, retries=2)
    fake.fail(503, times=100)
    with pytest.raises(ArtifactRegistryError) as failed:
        templates.resolve(PACKAGE, "latest")
    url = f"https://{API_HOST}/v1/{fake.resource}/packages/{PACKAGE}/tags/latest"
    assert str(failed.value) == (
        f"Artifact Registry answered GET {url} with HTTP 503 after 3 attempts: "
        "UNAVAILABLE injected fault"
    )
    assert failed.value.url == url
    assert len(fake.requests) == 3


def test_a_permanent_error_is_not_retried(fake, tmp_path):
    templates = registry(fake)
    fake.fail(403)
    with pytest.raises(TemplateError, match=r"HTTP 403: PERMISSION_DENIED injected fault$"):
        templates.list_versions(PACKAGE)
    assert len(fake.requests) == 1


def test_a_hanging_registry_times_out_quickly(fake, tmp_path):
    templates = registry(fake, timeout=0.3)
    fake.hang(30)
    started = time.monotonic()
    with pytest.raises(ArtifactRegistryError) as failed:
        templates.resolve(PACKAGE, "latest")
    assert time.monotonic() - started < 3
    url = f"https://{API_HOST}/v1/{fake.resource}/packages/{PACKAGE}/tags/latest"
    assert str(failed.value) == f"Artifact Registry did not answer GET {url} within 0.3 s"
    assert len(fake.requests) == 1  # a timeout is reported, not retried


def test_google_credentials_are_refreshed_when_stale(fake, tmp_path):
    class Tokens(google_credentials.Credentials):
        """Stands in for Google's token endpoint: each refresh issues a new token."""

        issued = 0

        def refresh(self, request):
            self.issued += 1
            self.token = f"token-{self.issued}"

    tokens = Tokens()
    templates = ArtifactRegistryTemplates(
        fake.repository_url, auth=tokens, session=fake.session(), backoff=0.01
    )
    templates.upload(PACKAGE, template(tmp_path, "a"), ["latest"])
    tokens.token = None  # expired
    templates.resolve(PACKAGE, "latest")
    seen = [r.headers["authorization"] for r in fake.requests]
    assert seen[0] == "Bearer token-1" and seen[-1] == "Bearer token-2"
    assert tokens.issued == 2


def test_a_compiled_pipeline_is_stored_under_its_pipeline_name(fake, tmp_path):
    from ml_platform.pipelines.compile import compile_pipeline

    compiled = compile_pipeline(TRAINING_PIPELINE, tmp_path / "training.yaml", image="img:1")
    templates = registry(fake)
    uploaded = templates.upload(TRAINING_PIPELINE, compiled, ["latest"])
    assert templates.fetch(templates.resolve(TRAINING_PIPELINE, "latest")) == compiled.read_bytes()
    assert uploaded.version == sha256_of(compiled)

    with pytest.raises(TemplateError, match="stored as template 'flight-delay-training'"):
        templates.upload("flight-delay-prediction", compiled, ["latest"])


def test_the_fake_refuses_every_other_host(fake):
    with pytest.raises(requests.ConnectionError, match=r"does not serve oauth2\.googleapis\.com"):
        fake.session().get("https://oauth2.googleapis.com/token", timeout=1)


def test_repository_urls_are_checked():
    for url in [
        "https://us-central1-kfp.pkg.dev/acme-ml",
        "https://us-central1-kfp.pkg.dev/acme-ml/repo/package",
        "https://us-central1-docker.pkg.dev/acme-ml/repo",
    ]:
        with pytest.raises(ValueError, match="not an Artifact Registry KFP repository URL"):
            ArtifactRegistryTemplates(url)


def test_constructing_the_registry_imports_neither_kfp_nor_google():
    code = (
        "import sys\n"
        "from ml_platform.resources.templates.artifact_registry import ArtifactRegistryTemplates\n"
        "ArtifactRegistryTemplates('https://us-central1-kfp.pkg.dev/p/r')\n"
        "heavy = [m for m in ('kfp', 'google.auth') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_application_default_credentials_are_looked_up_on_first_use(fake, tmp_path, monkeypatch):
    lookups = []

    def default(scopes=None, **kwargs):
        lookups.append(scopes)
        return oauth2_credentials.Credentials(token="adc-token"), "acme-ml"

    monkeypatch.setattr(google.auth, "default", default)
    templates = ArtifactRegistryTemplates(fake.repository_url, session=fake.session(), backoff=0.01)
    assert lookups == []
    uploaded = templates.upload(PACKAGE, template(tmp_path, "a"), ["latest"])
    assert templates.resolve(PACKAGE, "latest") == uploaded
    assert lookups == [["https://www.googleapis.com/auth/cloud-platform"]]  # once
    assert {r.headers["authorization"] for r in fake.requests} == {"Bearer adc-token"}


def test_a_retry_after_past_the_deadline_ends_the_retries(fake):
    templates = registry(fake)
    fake.fail(503, times=100, retry_after="3600")
    started = time.monotonic()
    with pytest.raises(
        ArtifactRegistryError, match=r"HTTP 503 after 1 attempt: UNAVAILABLE injected fault$"
    ):
        templates.resolve(PACKAGE, "latest")
    assert time.monotonic() - started < 3
    assert len(fake.requests) == 1


def test_using_the_registry_imports_no_kfp(tmp_path):
    # This module imports kfp (ApiAuth): a fresh interpreter shows the registry does not.
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path

        import requests

        from ml_platform.resources.templates.artifact_registry import ArtifactRegistryTemplates
        from tests.gcp.fake_artifact_registry import FakeArtifactRegistry

        class Bearer(requests.auth.AuthBase):
            def __call__(self, request):
                request.headers["Authorization"] = "Bearer test-token"
                return request

        source, package = Path(sys.argv[1]), sys.argv[2]
        with FakeArtifactRegistry() as fake:
            templates = ArtifactRegistryTemplates(
                fake.repository_url, auth=Bearer(), session=fake.session()
            )
            uploaded = templates.upload(package, source, ["latest"])
            assert templates.fetch(templates.resolve(package, "latest")) == source.read_bytes()
            assert templates.list_versions(package) == [uploaded]
        assert "kfp" not in sys.modules, "kfp was imported"
        """
    )
    source = template(tmp_path, "a")
    subprocess.run(
        [sys.executable, "-c", code, str(source), PACKAGE], check=True, cwd=REPOSITORY_ROOT
    )
