"""The links a local pipeline job reports are ones a browser opens from the Dagster UI.

A job a Dagster run started links to that run's step output in the Dagster UI (the view the
UI itself opens for a step's stderr), relative to the webserver, never a ``file://`` URL,
which a browser does not follow from an http page. A job started outside Dagster (the CLI)
has no Dagster page: its link stays its log file, for the terminal that started it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import dagster as dg
import pytest

from ml_platform.assets.pipeline_jobs import job_metadata
from ml_platform.resources.pipeline_runs import JobState
from ml_platform.resources.pipeline_runs.local import JobStore, job_links, to_pipeline_job
from ml_platform.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(
        {"ML_PLATFORM_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "home")}
    )


def record_job(settings: Settings, *, asset: str, run_id: str | None) -> str:
    """A succeeded job in the local store, labelled as ``launch.job_request`` labels one."""
    store = JobStore(settings.job_store_path)
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    job_dir = Path(settings.pipeline_root) / job_id
    labels = settings.job_labels(asset=asset, partition=None, run_id=run_id, inputs="abc")
    store.insert(
        {
            "job_id": job_id,
            "pipeline": "flight-delay-training",
            "display_name": job_id,
            "state": str(JobState.SUCCEEDED),
            "labels": json.dumps(labels, sort_keys=True),
            "create_time": 1.0,
            "start_time": 2.0,
            "end_time": 3.0,
            "update_time": 3.0,
            "template_uri": "file:///templates/flight-delay-training",
            "template_version": "sha256:0",
            "template_path": str(job_dir / "pipeline.yaml"),
            "parameters": "{}",
            "pipeline_root": str(job_dir),
            "log_path": str(job_dir / "job.log"),
        }
    )
    return job_id


def test_a_job_a_dagster_run_started_links_to_its_steps_stderr_in_the_ui(settings):
    run_id = str(uuid.uuid4())
    job_id = record_job(settings, asset="flight_delay_model", run_id=run_id)
    job = to_pipeline_job(JobStore(settings.job_store_path).row(job_id))

    link = job.links["log"]
    parts = urlsplit(link)
    # Relative to the webserver that shows it, whatever its host and port.
    assert (parts.scheme, parts.netloc) == ("", "")
    assert urljoin("http://127.0.0.1:3001/", link).startswith(
        f"http://127.0.0.1:3001/runs/{run_id}?"
    )
    # The run page on the step's stderr, the step selected as a click on it selects it.
    assert parts.path == f"/runs/{run_id}"
    assert parse_qs(parts.query) == {
        "logType": ["stderr"],
        "selection": ['name:"flight_delay_model"'],
    }
    # What the materialization records: its one link, a URL the UI renders as a link.
    metadata = job_metadata(job)
    links = {k: v.value for k, v in metadata.items() if isinstance(v, dg.UrlMetadataValue)}
    assert links == {"log_link": link}


def test_a_job_started_outside_dagster_links_to_its_log_file(settings):
    job_id = record_job(settings, asset="flight_delay_predictions", run_id=None)
    job = to_pipeline_job(JobStore(settings.job_store_path).row(job_id))
    log_file = Path(settings.pipeline_root) / job_id / "job.log"
    assert job.links == {"log": log_file.as_uri()}


def test_the_step_of_an_asset_key_with_a_prefix():
    run_id = str(uuid.uuid4())
    # Asset key ["reporting", "daily"]: label "reporting-daily", step "reporting__daily".
    link = job_links({"dagster_run_id": run_id, "asset": "reporting-daily"}, "/x/job.log")["log"]
    assert parse_qs(urlsplit(link).query)["selection"] == ['name:"reporting__daily"']
    # Without an asset label: the run's stderr, whichever step the UI picks.
    link = job_links({"dagster_run_id": run_id}, "/x/job.log")["log"]
    assert link == f"/runs/{run_id}?logType=stderr"
