"""The GCS artifact store through the official storage client and a real fake-gcs-server."""

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from ml_platform.resources.artifacts import (
    ArtifactError,
    GcsArtifactStore,
    LocalArtifactStore,
)

BUCKET = "acme-ml-pipelines"


def put(client: storage.Client, name: str, data: bytes = b"x") -> None:
    client.bucket(BUCKET).blob(name).upload_from_string(data)


def store(_fake) -> GcsArtifactStore:
    # Anonymous credentials for the fake; production uses Application Default Credentials.
    return GcsArtifactStore(
        f"gs://{BUCKET}/pipeline_root", project="acme-ml", credentials=AnonymousCredentials()
    )


def test_read_an_artifact(gcs):
    put(gcs, "pipeline_root/prod/job-1/evaluate/evaluation_plot", b"\x89PNG...")
    artifacts = store(gcs)
    uri = f"gs://{BUCKET}/pipeline_root/prod/job-1/evaluate/evaluation_plot"
    assert artifacts.read_bytes(uri) == b"\x89PNG..."
    with pytest.raises(ArtifactError, match=r"cannot read artifact gs://.*/missing"):
        artifacts.read_bytes(f"gs://{BUCKET}/pipeline_root/missing")


def test_delete_a_pull_requests_prefix_and_nothing_else(gcs):
    for i in range(1205):  # more than one page of the listing (1,000 per page)
        put(gcs, f"pipeline_root/branch/pr-7/job-{i // 100}/artifact-{i}")
    put(gcs, "pipeline_root/branch/pr-70/job-1/model")  # a prefix of "pr-7" as a string
    put(gcs, "pipeline_root/prod/job-1/model")
    artifacts = store(gcs)
    assert artifacts.delete_prefix("branch/pr-7") == 1205
    left = {blob.name for blob in gcs.list_blobs(BUCKET)}
    assert "pipeline_root/branch/pr-70/job-1/model" in left
    assert "pipeline_root/prod/job-1/model" in left
    assert not any(name.startswith("pipeline_root/branch/pr-7/") for name in left)
    assert artifacts.delete_prefix("branch/pr-7") == 0


@pytest.mark.parametrize("prefix", ["", "/", "../prod", "branch/../.."])
def test_a_prefix_outside_the_root_is_refused(gcs, tmp_path: Path, prefix: str):
    with pytest.raises(ArtifactError, match="refusing to delete"):
        store(gcs).delete_prefix(prefix)
    with pytest.raises(ArtifactError, match="refusing to delete"):
        LocalArtifactStore(tmp_path).delete_prefix(prefix)


def test_the_local_store(tmp_path: Path):
    (tmp_path / "job-1").mkdir()
    (tmp_path / "job-1" / "model").write_bytes(b"m")
    artifacts = LocalArtifactStore(tmp_path)
    assert artifacts.read_bytes(str(tmp_path / "job-1" / "model")) == b"m"
    assert artifacts.delete_prefix("job-1") == 1
    assert not (tmp_path / "job-1").exists()


def test_two_cleanups_at_once_delete_everything_once_and_neither_fails(gcs):
    # A re-run of the pull request's cleanup job while the first is still deleting.
    for i in range(400):
        put(gcs, f"pipeline_root/branch/pr-8/job-{i // 100}/artifact-{i}")
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = list(pool.map(lambda _: store(gcs).delete_prefix("branch/pr-8"), range(2)))
    assert sum(counts) == 400
    assert not list(gcs.list_blobs(BUCKET, prefix="pipeline_root/branch/pr-8/"))


@pytest.mark.parametrize("uri", ["gs://", "s3://acme-ml-pipelines/x", f"gs://{BUCKET}"])
def test_a_malformed_artifact_uri_is_named(gcs, uri: str):
    with pytest.raises(ArtifactError, match=re.escape(repr(uri)) + "|names no object"):
        store(gcs).read_bytes(uri)


def test_a_store_needs_a_bucket_and_says_which_prefix_it_could_not_delete(gcs):
    with pytest.raises(ArtifactError, match="not a GCS uri"):
        GcsArtifactStore("gs://")
    missing = GcsArtifactStore(
        "gs://no-such-bucket/pipeline_root", project="acme-ml", credentials=AnonymousCredentials()
    )
    with pytest.raises(ArtifactError, match=r"cannot delete gs://no-such-bucket/pipeline_root/"):
        missing.delete_prefix("branch/pr-8")
