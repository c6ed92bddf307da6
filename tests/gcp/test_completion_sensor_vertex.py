"""The completion sensor on the Vertex AI backend of a branch deployment, at the wire level.

The sensor is evaluated tick by tick (``dg.build_sensor_context`` on a real temporary
instance, the cursor carried over as the daemon does) with the pipeline runner
``backends.py`` builds: ``VertexPipelineRunner.from_settings``, whose real GAPIC REST
client talks to ``FakeVertex``. The tests assert on the list requests as they were sent.

Ended jobs get into the fake the way real ones do: created through the API by the
project's own launch code (``launch.job_request``, as ``ml-platform pipelines run`` does:
the branch's labels, no ``dagster_run_id`` for a job started outside Dagster, the compiled
spec, parameters and the template's version URL), then moved by the fake's clock through
RUNNING to SUCCEEDED (with the task details that carry the pipeline's outputs), FAILED
(with the failing task's error) or CANCELLED. Jobs of another pull request and of prod sit
in the same project and must never be acted upon.

Stand-ins for outside systems only: ``FakeVertex`` for Vertex AI, fake-gcs-server for GCS
(the one test of a training job, whose evaluation plot the sensor reads back), and
``RecordingAlerts`` for Slack.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from google.auth.credentials import AnonymousCredentials

from ml_platform.assets.model import MODEL_KEY
from ml_platform.assets.predictions import PREDICTIONS_KEY
from ml_platform.definitions import build_definitions
from ml_platform.launch import (
    MODEL_ASSET,
    PREDICTIONS_ASSET,
    job_request,
    prediction_parameters,
    training_parameters,
)
from ml_platform.pipelines import PREDICTION_PIPELINE, TRAINING_PIPELINE
from ml_platform.pipelines.compile import compile_pipeline
from ml_platform.resources.alerts import Alerts
from ml_platform.resources.artifacts import GcsArtifactStore
from ml_platform.resources.model_registry.vertex import VertexModelRegistry
from ml_platform.resources.pipeline_runs.vertex import VertexPipelineRunner
from ml_platform.resources.templates import (
    TemplateError,
    TemplateRegistry,
    TemplateVersion,
    template_version_of,
)
from ml_platform.resources.templates.local import LocalTemplateRegistry
from ml_platform.sensors import REPORTING_JOB, SENSOR_NAME, build_completion_sensor
from ml_platform.settings import Deployment, Settings
from tests.gcp.fake_vertex import FakeClock, FakeVertex, RecordedRequest
from tests.gcp.fake_vertex_models import FakeVertexModels
from tests.model_metrics import TRAINING_METRICS

PROJECT = "acme-ml"
REGION = "us-central1"
VERTEX_SERVICE_ACCOUNT = "vertex-pipelines@acme-ml.iam.gserviceaccount.com"
BUCKET = "acme-ml-pipelines"
REPOSITORY = "pipeline-templates"
PR, OTHER_PR = "1187", "1190"
TAG = f"pr-{PR}"
JOBS_PATH = f"/v1/projects/{PROJECT}/locations/{REGION}/pipelineJobs"
LOOKBACK = Settings.sensor_lookback_seconds
PAGE_SIZE = 100  # what the sensor's list_jobs asks for

# The list request's read mask as it goes over the wire (JSON field names).
READ_MASK = [
    "name",
    "displayName",
    "state",
    "labels",
    "createTime",
    "startTime",
    "endTime",
    "updateTime",
    "error",
    "templateUri",
    "templateMetadata.version",
    "pipelineSpec.pipelineInfo",
    "runtimeConfig.parameterValues",
]
# The one filter every tick of this branch sends, before its end-time term.
BRANCH_FILTER = (
    'labels.app="ml-platform" AND labels.deployment="branch" AND '
    f'labels.pull_request="{PR}" AND '
    '(state="PIPELINE_STATE_CANCELLED" OR state="PIPELINE_STATE_FAILED" OR '
    'state="PIPELINE_STATE_SUCCEEDED")'
)
SCORED = {"rows": 932, "mean_probability": 0.2114, "model_version": "sha256:5eed"}
SCORING_ERROR = (
    "ModelArtifactError: model artifact gs://acme-ml-pipelines/pipeline_root/x/model "
    "is not a flight-delay model"
)
PNG = b"\x89PNG\r\n\x1a\nan evaluation plot"


class RecordingAlerts(Alerts):
    """Stands in for Slack (an outside system): keeps what would have been posted."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, str]]] = []

    def send(self, title: str, text: str, links: Mapping[str, str] | None = None) -> None:
        self.sent.append((title, text, dict(links or {})))


class PublishedTemplates(TemplateRegistry):
    """The templates CD published to Artifact Registry, as the launch code resolves them:
    a tag to a ``sha256:`` version named by its Artifact Registry version URL. (Only the
    jobs' submitter uses it; the sensor never submits.)"""

    def __init__(self, compiled: Mapping[str, Path], tag: str) -> None:
        self.content = {package: path.read_bytes() for package, path in compiled.items()}
        self.tag = tag

    def _version(self, package: str) -> TemplateVersion:
        version = template_version_of(self.content[package])
        url = f"https://{REGION}-kfp.pkg.dev/{PROJECT}/{REPOSITORY}/{package}/{version}"
        return TemplateVersion(package, version, url, (self.tag,))

    def upload(self, package: str, template: Path, tags: Sequence[str]) -> TemplateVersion:
        raise TemplateError("CD publishes; nothing in these tests uploads")

    def resolve(self, package: str, tag: str) -> TemplateVersion:
        if tag != self.tag or package not in self.content:
            raise TemplateError(f"no template {package}:{tag}")
        return self._version(package)

    def list_versions(self, package: str) -> list[TemplateVersion]:
        return [self._version(package)]

    def fetch(self, version: TemplateVersion) -> bytes:
        return self.content[version.package]


def branch_settings(vertex: FakeVertex, tmp: Path, **env: str) -> Settings:
    return Settings.from_env(
        {
            "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT": "1",
            "DAGSTER_CLOUD_DEPLOYMENT_NAME": f"pr-{PR}",
            "DAGSTER_CLOUD_PULL_REQUEST_ID": PR,
            "ML_PLATFORM_GCP_PROJECT": PROJECT,
            "ML_PLATFORM_GCP_REGION": REGION,
            "ML_PLATFORM_GCS_BUCKET": BUCKET,
            "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": REPOSITORY,
            "ML_PLATFORM_VERTEX_SERVICE_ACCOUNT": VERTEX_SERVICE_ACCOUNT,
            "ML_PLATFORM_TEMPLATE_TAG": TAG,
            "ML_PLATFORM_VERTEX_API_ENDPOINT": vertex.url,
            "ML_PLATFORM_DATA_DIR": str(tmp / "data"),
            "DAGSTER_HOME": str(tmp / "home"),
            **env,
        }
    )


def rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Tick:
    result: dg.SensorResult
    requests: list[RecordedRequest]  # what reached Vertex during the tick

    @property
    def run_keys(self) -> list[str]:
        return [request.run_key for request in self.result.run_requests]

    def kinds(self) -> Counter[str]:
        return Counter(request.kind for request in self.requests)

    @property
    def lists(self) -> list[RecordedRequest]:
        return [request for request in self.requests if request.kind == "list"]

    @property
    def gets(self) -> list[str]:
        """The ids of the jobs looked up, in order."""
        gets = [request.path for request in self.requests if request.kind == "get"]
        assert all(path.startswith(f"{JOBS_PATH}/") for path in gets), gets
        return [path.removeprefix(f"{JOBS_PATH}/") for path in gets]

    def looked_up_once(self, must: Sequence[str], may: Sequence[str] = ()) -> None:
        """Each job of ``must`` was looked up exactly once; nothing else, except at most once
        each of ``may``."""
        counts = Counter(self.gets)
        assert all(counts[job_id(name)] == 1 for name in must), counts
        assert counts.keys() <= {job_id(name) for name in [*must, *may]}, counts
        assert max(counts.values(), default=1) == 1, counts


@dataclass
class Branch:
    """A branch deployment's sensor, the Vertex stand-in and the people who start jobs."""

    settings: Settings
    vertex: FakeVertex
    clock: FakeClock
    instance: dg.DagsterInstance
    defs: dg.Definitions
    runner: VertexPipelineRunner  # the sensor's, as backends.py builds it
    artifacts: GcsArtifactStore
    model_registry: VertexModelRegistry
    published: PublishedTemplates
    alerts: RecordingAlerts = field(default_factory=RecordingAlerts)
    cursor: str | None = None
    submitters: dict[tuple[str, str | None], VertexPipelineRunner] = field(default_factory=dict)

    def start_job(
        self,
        asset: str = PREDICTIONS_ASSET,
        *,
        day: str = "2013-10-01",
        ends: str = "SUCCEEDED",
        after: float = 600.0,
        dagster_run_id: str | None = None,
        settings: Settings | None = None,
        outputs: Mapping[str, Any] | None = None,
    ) -> str:
        """Start a job as ``ml-platform pipelines run`` does (or a Dagster run, with its
        id), in this branch or the deployment of ``settings``; it ends ``after`` seconds
        later in state ``ends``. Returns the job's full resource name."""
        settings = settings or self.settings
        if asset == MODEL_ASSET:
            partition = None
            parameters = training_parameters(settings, f"bigquery://{PROJECT}", date(2013, 10, 1))
        else:
            partition = day
            parameters = prediction_parameters(
                settings,
                f"bigquery://{PROJECT}",
                date.fromisoformat(day),
                f"{settings.pipeline_root}/model",
            )
        request = job_request(
            settings,
            self.published,
            asset=asset,
            partition=partition,
            parameters=parameters,
            dagster_run_id=dagster_run_id,
        )
        failed = ("score-flights", SCORING_ERROR) if ends == "FAILED" else None
        if ends == "SUCCEEDED" and outputs is None:
            outputs = SCORED
        self.vertex.plan(
            request.job_id,
            (0, "RUNNING"),
            (after, ends),
            outputs=outputs if ends == "SUCCEEDED" else None,
            failed_task=failed,
        )
        who = (settings.deployment_name, settings.pull_request_id)
        if who not in self.submitters:
            self.submitters[who] = VertexPipelineRunner.from_settings(settings, self.published)
        return self.submitters[who].submit(request).name

    def tick(
        self,
        sensor: dg.SensorDefinition | None = None,
        runner: VertexPipelineRunner | None = None,
    ) -> Tick:
        sensor = sensor or self.defs.resolve_sensor_def(SENSOR_NAME)
        # The resources the sensor asks for, as the daemon gives it.
        resources = {
            "pipeline_runner": runner or self.runner,
            "artifacts": self.artifacts,
            "model_registry": self.model_registry,
            "alerts": self.alerts,
        }
        before = len(self.vertex.requests)
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources=resources, definitions=self.defs
        )
        result = sensor.evaluate_tick(context)
        self.cursor = result.cursor
        for event in result.asset_events:
            self.instance.report_runless_asset_event(event)
        return Tick(result, self.vertex.requests[before:])


def job_id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def the_filter(tick: Tick) -> str:
    (only,) = {request.query["filter"] for request in tick.lists}
    return only


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compiled")
    image = f"{REGION}-docker.pkg.dev/{PROJECT}/images/ml-platform:pr-{PR}"
    return {
        name: compile_pipeline(name, folder / f"{name}.yaml", image=image)
        for name in (TRAINING_PIPELINE, PREDICTION_PIPELINE)
    }


@pytest.fixture
def branch(tmp_path: Path, compiled) -> Iterator[Branch]:
    clock = FakeClock()
    with (
        FakeVertex(PROJECT, REGION, clock=clock.time) as vertex,
        FakeVertexModels(PROJECT, REGION) as models,
        dg.instance_for_test() as instance,
    ):
        settings = branch_settings(vertex, tmp_path)
        assert settings.deployment is Deployment.BRANCH
        yield Branch(
            settings=settings,
            vertex=vertex,
            clock=clock,
            instance=instance,
            defs=build_definitions(settings),
            # backends.py: VertexPipelineRunner.from_settings(settings, templates). Any
            # registry will do: the sensor never submits. The plain-http endpoint makes the
            # runner use anonymous credentials by itself.
            runner=VertexPipelineRunner.from_settings(
                settings, LocalTemplateRegistry(tmp_path / "templates")
            ),
            # backends.py's registry, on the fake ModelService (its own local endpoint).
            model_registry=VertexModelRegistry.from_settings(settings, api_endpoint=models.url),
            # backends.py's store, with anonymous credentials for fake-gcs-server.
            artifacts=GcsArtifactStore(
                settings.pipeline_root,
                project=settings.gcp_project,
                credentials=AnonymousCredentials(),
            ),
            published=PublishedTemplates(compiled, TAG),
        )
        assert not vertex.unsupported, f"requests the fake refused: {vertex.unsupported}"


# -- the tests ------------------------------------------------------------------------------


def test_each_ended_job_of_the_branch_is_handled_once_and_no_other_job_is_touched(branch):
    start = branch.clock.time()
    succeeded = branch.start_job(day="2013-10-01", after=600)
    failed = branch.start_job(day="2013-10-02", ends="FAILED", after=300)
    cancelled = branch.start_job(day="2013-10-03", ends="CANCELLED", after=400)
    # A Dagster run's failed job: its run reports the failure itself, so no alert here.
    by_dagster = branch.start_job(
        day="2013-10-04", ends="FAILED", after=350, dagster_run_id="8f2c1b7a-0d4e-4c55"
    )
    running = branch.start_job(day="2013-10-05", after=10_000)
    # The same project holds another pull request's jobs and prod's: never ours.
    other_pr = branch_settings(
        branch.vertex, branch.settings.data_dir.parent, DAGSTER_CLOUD_PULL_REQUEST_ID=OTHER_PR
    )
    prod = Settings.from_env(
        {
            "DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod",
            "ML_PLATFORM_GCP_PROJECT": PROJECT,
            "ML_PLATFORM_GCS_BUCKET": BUCKET,
            "ML_PLATFORM_TEMPLATE_TAG": TAG,
            "ML_PLATFORM_VERTEX_API_ENDPOINT": branch.vertex.url,
        }
    )
    foreign = [
        branch.start_job(day="2013-10-01", after=500, settings=other_pr),
        branch.start_job(day="2013-10-02", ends="FAILED", after=450, settings=other_pr),
        branch.start_job(day="2013-10-01", after=550, settings=prod),
    ]
    branch.clock.advance(700)

    first = branch.tick()
    # One list call (everything fits one page), and a get for the succeeded job's outputs.
    # A failed or cancelled job started outside Dagster is read in full too, once, for its
    # failing task's error.
    assert first.kinds()["list"] == 1
    first.looked_up_once([succeeded], may=[failed, cancelled])
    (listing,) = first.lists
    assert listing.path == JOBS_PATH
    # The very first tick asks for every ended job of the branch: no end-time term yet.
    assert listing.query["filter"] == BRANCH_FILTER
    assert "end_time" not in listing.query["filter"]
    assert listing.query["orderBy"] == "end_time"
    assert listing.query["pageSize"] == str(PAGE_SIZE)
    assert "pageToken" not in listing.query
    assert listing.query["readMask"].split(",") == READ_MASK
    assert listing.status == 200

    # The succeeded prediction job (outside Dagster): recorded on its partition, and one
    # refresh of the reporting keyed by its full resource name.
    assert succeeded == f"projects/{PROJECT}/locations/{REGION}/pipelineJobs/{job_id(succeeded)}"
    assert first.run_keys == [succeeded]
    (request,) = first.result.run_requests
    assert request.job_name == REPORTING_JOB
    assert request.tags["ml_platform/pipeline_job"] == job_id(succeeded)
    assert request.tags["ml_platform/flight_date"] == "2013-10-01"
    (materialization,) = first.result.asset_events
    assert materialization.asset_key == PREDICTIONS_KEY
    assert materialization.partition == "2013-10-01"
    metadata = materialization.metadata
    assert metadata["dagster/row_count"].value == 932
    assert metadata["mean_delay_probability"].value == 0.2114
    assert metadata["model_version"].value == "sha256:5eed"
    assert metadata["pipeline_job"].value == succeeded
    assert metadata["pipeline_seconds"].value == 600.0
    assert (
        metadata["template_version"].value == branch.published._version(PREDICTION_PIPELINE).version
    )
    assert metadata["console_link"].value.endswith(f"/runs/{job_id(succeeded)}?project={PROJECT}")
    assert metadata["model_uri"].value == f"{branch.settings.pipeline_root}/model"
    recorded = branch.instance.get_latest_materialization_event(PREDICTIONS_KEY)
    assert recorded.asset_materialization.partition == "2013-10-01"

    # Failed and cancelled jobs started outside Dagster: an alert each (oldest end first),
    # with the job's error and its links; no run.
    assert [title for title, _, _ in branch.alerts.sent] == [
        f"Pipeline job failed: {job_id(failed)}",
        f"Pipeline job cancelled: {job_id(cancelled)}",
    ]
    # Vertex's own message, and the failing task's (read with a get: the list view lacks it).
    assert branch.alerts.sent[0][1].startswith("The DAG failed because some tasks failed.")
    assert branch.alerts.sent[1][1] == "CANCELLED"
    links = branch.alerts.sent[0][2]
    assert links["console"].endswith(f"/runs/{job_id(failed)}?project={PROJECT}")
    assert "logs" in links

    # Nothing about another pull request's, prod's or a running job: none was listed (the
    # filter), looked up or acted upon.
    untouched = {job_id(name) for name in [*foreign, running, by_dagster]}
    assert not untouched & set(first.gets)
    assert not any(job in key for key in first.run_keys for job in untouched)
    assert not any(job in title for title, _, _ in branch.alerts.sent for job in untouched)

    # Second tick, nothing new: one list call, no get, no run, no event, no alert.
    second = branch.tick()
    assert second.kinds() == {"list": 1}
    assert second.run_keys == [] and second.result.asset_events == []
    assert len(branch.alerts.sent) == 2
    # From now on the listing starts at the newest end handled, minus the lookback.
    newest_end = start + 600
    assert the_filter(second) == (
        f'{BRANCH_FILTER} AND end_time>"{rfc3339(newest_end - LOOKBACK)}"'
    )
    (listing,) = second.lists
    assert listing.query["orderBy"] == "end_time"
    assert listing.query["pageSize"] == str(PAGE_SIZE)
    assert listing.query["readMask"].split(",") == READ_MASK

    # The running job ends: the next tick handles it, and only it.
    branch.clock.advance(10_000)
    third = branch.tick()
    assert third.run_keys == [running]
    assert third.gets == [job_id(running)]
    assert the_filter(third) == the_filter(second)  # no newer end was handled in between
    assert branch.tick().kinds() == {"list": 1}


def test_a_restarted_sensor_with_the_same_cursor_requests_nothing_twice(branch, tmp_path):
    succeeded = branch.start_job(day="2013-11-05", after=120)
    failed = branch.start_job(day="2013-11-06", ends="FAILED", after=60)
    branch.clock.advance(200)
    assert branch.tick().run_keys == [succeeded]
    assert len(branch.alerts.sent) == 1

    # The code server restarts: new Definitions, a new sensor object and a new runner (a
    # new client); the cursor is what Dagster stored.
    settings = branch_settings(branch.vertex, tmp_path)
    sensor = build_completion_sensor(settings)
    assert sensor is not branch.defs.resolve_sensor_def(SENSOR_NAME)
    runner = VertexPipelineRunner.from_settings(settings, LocalTemplateRegistry(tmp_path / "t"))
    branch.defs = build_definitions(settings)
    again = branch.tick(sensor=sensor, runner=runner)
    assert again.run_keys == [] and again.result.asset_events == []
    assert again.kinds() == {"list": 1}
    assert len(branch.alerts.sent) == 1, "the failed job was reported twice"
    assert job_id(failed) in branch.alerts.sent[0][0]

    # ... and it still catches what ends after the restart, once.
    later = branch.start_job(day="2013-11-07", after=30)
    branch.clock.advance(60)
    assert branch.tick(sensor=sensor, runner=runner).run_keys == [later]
    assert branch.tick(sensor=sensor, runner=runner).run_keys == []


def test_more_ended_jobs_than_one_page_are_all_handled_following_the_page_token(branch):
    count = PAGE_SIZE + 30
    succeeded, failed = [], []
    for i in range(count):
        day = date.fromordinal(date(2013, 1, 1).toordinal() + i).isoformat()
        ends = "SUCCEEDED" if i % 5 == 0 else ("FAILED", "CANCELLED")[i % 2]
        name = branch.start_job(day=day, ends=ends, after=60 + i)  # distinct end times
        (succeeded if ends == "SUCCEEDED" else failed).append(name)
    branch.clock.advance(60 + count)

    first = branch.tick()
    assert first.kinds()["list"] == 2
    first.looked_up_once(succeeded, may=failed)
    page_one, page_two = first.lists
    assert "pageToken" not in page_one.query
    assert page_two.query["pageToken"]
    # The next page repeats the query exactly (a page token is only good for its query).
    assert {k: v for k, v in page_two.query.items() if k != "pageToken"} == page_one.query
    assert page_one.query["filter"] == BRANCH_FILTER
    # Every job is handled, once, in end order across the pages.
    assert first.run_keys == succeeded
    partitions = [event.partition for event in first.result.asset_events]
    assert len(partitions) == len(succeeded) == len(set(partitions))
    assert [title.rsplit(" ", 1)[-1] for title, _, _ in branch.alerts.sent] == [
        job_id(name) for name in failed
    ]

    # Nothing new: nothing is requested. Every job ended inside the lookback window, so the
    # window still holds more than a page of (handled) jobs: the tick lists both pages.
    second = branch.tick()
    assert second.run_keys == [] and second.result.asset_events == []
    assert len(branch.alerts.sent) == len(failed)
    assert second.kinds() == {"list": 2}
    # Once they are older than the lookback, a tick is a single list call again.
    newest = branch.start_job(day="2013-12-31", after=LOOKBACK + 60)
    branch.clock.advance(LOOKBACK + 61)
    assert branch.tick().run_keys == [newest]
    quiet = branch.tick()
    assert quiet.kinds() == {"list": 1} and quiet.run_keys == []


def test_a_job_whose_end_shows_up_late_is_caught_by_the_lookback(branch):
    """Vertex's listing is eventually consistent: a job may appear after a job that ended
    later has been handled. The fake's ``add_job`` places such a job directly."""
    start = branch.clock.time()
    first = branch.start_job(day="2013-10-01", after=900)
    branch.clock.advance(901)
    assert branch.tick().run_keys == [first]
    labels = branch.settings.job_labels(
        asset=PREDICTIONS_ASSET, partition="2013-10-02", run_id=None
    )
    branch.vertex.add_job(
        "flight-delay-predictions-2013-10-02-late",
        state="FAILED",
        labels=labels,
        created=start,
        ended=start + 300,  # before `first` ended, inside the lookback
    )
    late = branch.tick()
    assert late.run_keys == []
    assert [title for title, _, _ in branch.alerts.sent] == [
        "Pipeline job failed: flight-delay-predictions-2013-10-02-late"
    ]
    assert branch.tick().kinds() == {"list": 1} and len(branch.alerts.sent) == 1


def test_a_failed_jobs_alert_says_which_task_failed_and_why(branch):
    branch.start_job(ends="FAILED", after=60)
    branch.clock.advance(61)
    branch.tick()
    ((_, text, _),) = branch.alerts.sent
    assert f"score-flights: {SCORING_ERROR}" in text


def test_one_job_the_sensor_cannot_read_does_not_stop_the_others(branch):
    # Its template declared the outputs, but the run recorded only the row count.
    unreadable = branch.start_job(day="2013-10-01", after=60, outputs={"rows": 932})
    later = branch.start_job(day="2013-10-02", after=120)
    branch.clock.advance(121)
    tick = branch.tick()
    assert tick.run_keys[-1:] == [later]
    assert any(job_id(unreadable) in title for title, _, _ in branch.alerts.sent)
    assert branch.tick().run_keys == []


def test_a_tick_that_fails_half_way_alerts_nothing_and_its_retry_alerts_once(branch):
    first = branch.start_job(day="2013-10-01", ends="FAILED", after=60)
    second = branch.start_job(day="2013-10-02", ends="FAILED", after=120)
    branch.clock.advance(121)
    # The first job's look-up answers; the second's is refused: the tick fails.
    branch.vertex.fail_next("get", 1, 403, skip=1)
    with pytest.raises(Exception, match="403"):
        branch.tick()
    assert branch.alerts.sent == [] and branch.cursor is None
    branch.tick()  # evaluated again with the same cursor, as the daemon does
    assert [title for title, _, _ in branch.alerts.sent] == [
        f"Pipeline job failed: {job_id(first)}",
        f"Pipeline job failed: {job_id(second)}",
    ]


# -- a training job started outside Dagster (its evaluation plot is read from GCS) ----------


def test_a_training_job_from_outside_dagster_is_recorded_on_the_model(branch, gcs):
    plot_uri = f"{branch.settings.pipeline_root}/manual/train-and-evaluate/evaluation_plot"
    gcs.bucket(BUCKET).blob(plot_uri.removeprefix(f"gs://{BUCKET}/")).upload_from_string(PNG)
    outputs = {
        "model": {
            "uri": f"{branch.settings.pipeline_root}/manual/train-and-evaluate/model",
            "metadata": {"version": "hgb-3f9a"},
        },
        "metrics": {"metadata": TRAINING_METRICS},
        "evaluation_plot": {"uri": plot_uri, "metadata": {}},
        "roc_auc": 0.7782,
        "baseline_roc_auc": 0.6936,
    }
    trained = branch.start_job(MODEL_ASSET, after=900, outputs=outputs)
    branch.clock.advance(901)

    tick = branch.tick()
    assert tick.kinds() == {"list": 1, "get": 1}  # the get reads the job's outputs
    assert tick.run_keys == []  # a new model does not change the reporting
    materialization, *checks = tick.result.asset_events
    assert materialization.asset_key == MODEL_KEY
    assert materialization.metadata["pipeline_job"].value == trained
    assert materialization.metadata["model_uri"].value == outputs["model"]["uri"]
    assert materialization.metadata["evaluation_plot_uri"].value == plot_uri
    assert materialization.metadata["evaluation_plot"].value.startswith(
        "![evaluation](data:image/png;base64,"
    )
    assert {(c.asset_key, c.check_name, c.passed) for c in checks} == {
        (MODEL_KEY, "beats_baseline", True),
        (MODEL_KEY, "beats_champion", True),
    }
    # Registered in the pull request's own Vertex model, and its first champion.
    (version,) = branch.model_registry.list_versions()
    assert version.artifact_uri == outputs["model"]["uri"] and "champion" in version.aliases
    assert branch.model_registry.model_id == f"flight-delay-pr-{PR}"
    assert branch.tick().result.asset_events == []


def test_a_training_job_whose_plot_is_gone_does_not_stop_the_sensor(branch):
    outputs = {
        "model": {"uri": f"{branch.settings.pipeline_root}/m/model", "metadata": {}},
        "metrics": {"metadata": TRAINING_METRICS},
        "evaluation_plot": {"uri": f"{branch.settings.pipeline_root}/gone/plot", "metadata": {}},
    }
    trained = branch.start_job(MODEL_ASSET, after=60, outputs=outputs)
    later = branch.start_job(day="2013-10-02", after=120)
    branch.clock.advance(121)
    assert branch.tick().run_keys == [later]
    ((title, text, _),) = branch.alerts.sent
    assert title == f"Pipeline job not recorded: {job_id(trained)}"
    assert "ArtifactError" in text and "gone/plot" in text
    assert branch.model_registry.list_versions() == []  # nothing registered from it
    assert branch.tick().run_keys == [] and len(branch.alerts.sent) == 1
