"""`ml-platform branch cleanup`: a closed pull request's datasets and artifacts go, nothing
else does. The CLI runs in its own process, as CI runs it, against the BigQuery emulator
and fake-gcs-server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pyarrow as pa
import pytest

from tests.gcp.bigquery_emulator import PROJECT, Emulator, bigquery_warehouse, bq_emulator
from tests.gcp.fake_vertex import FakeVertex

__all__ = ["bq_emulator"]  # the fixture, imported for pytest

BUCKET = "acme-ml-pipelines"
LAYERS = ("raw", "staging", "features", "predictions", "reporting")


@pytest.fixture
def vertex() -> Iterator[FakeVertex]:
    with FakeVertex(PROJECT, "us-central1") as fake:
        yield fake


def test_cleanup_drops_the_pull_requests_data_and_nothing_else(
    bq_emulator: Emulator, gcs_server, gcs, vertex: FakeVertex
):
    client = gcs
    # Pipeline jobs still running: this PR's (cancelled first, or they would write on after
    # its datasets are gone), another PR's and prod's (left alone).
    now = time.time()
    branch = {"app": "ml-platform", "deployment": "branch"}
    for job_id, state, labels in [
        ("pr-7-scoring", "RUNNING", {**branch, "pull_request": "7"}),
        ("pr-7-training", "QUEUED", {**branch, "pull_request": "7"}),
        ("pr-70-scoring", "RUNNING", {**branch, "pull_request": "70"}),
        ("prod-scoring", "RUNNING", {"app": "ml-platform", "deployment": "prod"}),
    ]:
        vertex.add_job(job_id, state=state, created=now, labels=labels)
    warehouse = bigquery_warehouse(bq_emulator.endpoint)
    rows = pa.table({"x": [1, 2]})
    for suffix in ("_pr_7", "_pr_70", ""):  # this PR, another PR, prod
        for layer in LAYERS:
            warehouse.replace_table(f"flights_{layer}{suffix}", "t", rows)
    for prefix in ("branch/pr-7/job-1", "branch/pr-7/job-2", "branch/pr-70/job-1", "prod/job-1"):
        client.bucket(BUCKET).blob(f"pipeline_root/{prefix}/model").upload_from_string(b"m")

    env = {
        **os.environ,
        # CI's environment describes prod; the command derives the branch from the PR id.
        "DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod",
        "ML_PLATFORM_GCP_PROJECT": PROJECT,
        "ML_PLATFORM_GCS_BUCKET": BUCKET,
        "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": "pipeline-templates",
        "ML_PLATFORM_BIGQUERY_API_ENDPOINT": bq_emulator.endpoint,
        "ML_PLATFORM_VERTEX_API_ENDPOINT": vertex.url,
        "STORAGE_EMULATOR_HOST": gcs_server.url,
    }
    cleanup = [sys.executable, "-m", "ml_platform.cli", "branch", "cleanup", "--pull-request"]
    done = subprocess.run([*cleanup, "7"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "dataset flights_raw_pr_7: dropped" in done.stdout
    assert "2 objects deleted" in done.stdout
    cancelled = {
        call.path.rsplit("/", 1)[-1].removesuffix(":cancel") for call in vertex.calls("cancel")
    }
    assert cancelled == {"pr-7-scoring", "pr-7-training"}
    assert done.stdout.index("cancelled") < done.stdout.index("dataset")  # before the drop

    for layer in LAYERS:
        assert not warehouse.table_exists(f"flights_{layer}_pr_7", "t")
        assert warehouse.table_exists(f"flights_{layer}_pr_70", "t")
        assert warehouse.table_exists(f"flights_{layer}", "t")  # prod is untouched
    left = {blob.name for blob in client.list_blobs(BUCKET)}
    assert left == {
        "pipeline_root/branch/pr-70/job-1/model",
        "pipeline_root/prod/job-1/model",
    }
    # Running it again (a re-run of the workflow) finds nothing and succeeds.
    again = subprocess.run([*cleanup, "7"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "not found" in again.stdout


def test_a_pull_request_id_that_is_not_a_number_is_refused(bq_emulator: Emulator):
    env = {
        **os.environ,
        "DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod",
        "ML_PLATFORM_GCP_PROJECT": PROJECT,
        "ML_PLATFORM_GCS_BUCKET": BUCKET,
        "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": "pipeline-templates",
    }
    done = subprocess.run(
        [sys.executable, "-m", "ml_platform.cli", "branch", "cleanup", "--pull-request", "''"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode != 0
    assert "must be a number" in done.stderr
