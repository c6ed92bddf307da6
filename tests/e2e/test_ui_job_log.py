"""A local pipeline job's log, read in a real browser from the link its materialization shows.

The scratch project's training run (a Dagster run, without the UI) ran the training pipeline
as a local job. The model's page in the UI shows the job's ``log_link``; following it opens
the Dagster UI's own view of that run's step output (stderr), where the job's log is: lines
kfp.local wrote, not only Dagster's. Never a ``file://`` link, which the browser refuses.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from ml_platform.resources.pipeline_runs.local import JobStore, to_pipeline_job
from ml_platform.settings import Settings
from tests.e2e.conftest import DagsterDev

pytestmark = pytest.mark.e2e

TRAINING_PIPELINE = "flight-delay-training"


def test_the_log_link_of_a_local_job_opens_its_log_in_the_ui(
    browser_page: Page, dagster_dev: DagsterDev
) -> None:
    page, server = browser_page, dagster_dev
    settings = Settings.from_env(server.project.env)
    rows = [
        row
        for row in JobStore(settings.job_store_path).query(
            labels=None, states=None, ended_after=None, page_size=100
        )
        if row["pipeline"] == TRAINING_PIPELINE
    ]
    assert len(rows) == 1, [row["job_id"] for row in rows]
    job = to_pipeline_job(rows[0])
    run_id = job.labels["dagster_run_id"]
    link = job.links["log"]
    assert link.startswith(f"/runs/{run_id}?"), link
    # A line the job itself wrote (kfp.local's executor), which no Dagster log has.
    line = next(
        text.strip()
        for text in Path(rows[0]["log_path"]).read_text(errors="replace").splitlines()
        if "[KFP Executor" in text and "Looking for component" in text
    )

    # 1. The model's latest materialization shows the link.
    page.goto(f"{server.url}/assets/flight_delay_model")
    expect(page.get_by_text("Latest materialization", exact=True)).to_be_visible()
    anchor = page.locator(f'a[href="{link}"]').first
    expect(anchor).to_be_visible()

    # 2. It opens, in a new tab, the run's step output in the Dagster UI, with the job's log.
    with page.context.expect_page() as opened:
        anchor.click()
    log_page = opened.value
    expect(log_page).to_have_url(re.compile(rf"/runs/{run_id}\?.*logType=stderr"))
    expect(log_page.get_by_text(line).first).to_be_visible(timeout=60_000)
