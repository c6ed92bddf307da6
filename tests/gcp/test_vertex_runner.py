"""The Vertex AI Pipelines runner, through the real GAPIC client over HTTP to a local fake.

Nothing of ours is mocked: ``VertexPipelineRunner`` builds a real ``PipelineServiceClient``
(REST transport, anonymous credentials) whose requests reach ``FakeVertex``; the fake
stands in for Google only. A fake clock drives both the runner's waiting and the jobs'
progress, so an hour of polling takes milliseconds and the tests check behaviour, not time.
"""

import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import RefreshError
from google.cloud.aiplatform_v1 import types

from ml_platform.assets.pipeline_jobs import job_metadata
from ml_platform.pipelines import PREDICTION_PIPELINE, TRAINING_PIPELINE
from ml_platform.pipelines.compile import compile_pipeline
from ml_platform.resources.pipeline_runs import (
    TERMINAL_STATES,
    JobRequest,
    JobState,
    PipelineJobError,
    make_job_id,
)
from ml_platform.resources.pipeline_runs.vertex import (
    VERTEX_POLL,
    VertexApiError,
    VertexPipelineRunner,
    list_filter,
    vertex_labels,
)
from ml_platform.resources.templates.local import LocalTemplateRegistry
from ml_platform.settings import Settings
from tests.gcp.fake_vertex import BILLING_LABEL, FakeClock, FakeVertex

REPOSITORY_URL = "https://us-central1-kfp.pkg.dev/acme-ml/pipeline-templates"
RUN_ID = "8f2c1b7a-0d4e-4c55-9a3b-1e2f3a4b5c6d"
SERVICE_ACCOUNT = "pipelines@acme-ml.iam.gserviceaccount.com"
NETWORK = "projects/123456789012/global/networks/ml-vpc"

TRAINING_OUTPUTS = {
    "model": {
        "uri": "gs://acme-ml-pipelines/pipeline_root/prod/model",
        "metadata": {"version": "hgb-3f9a", "framework": "scikit-learn 1.6.1", "train_rows": 202},
    },
    "metrics": {
        "metadata": {"roc_auc": 0.7782, "baseline_roc_auc": 0.6936, "log_loss": 0.441},
    },
    "evaluation_plot": {"metadata": {"mime_type": "image/png"}},
    "roc_auc": 0.7782,
    "baseline_roc_auc": 0.6936,
}
PREDICTION_OUTPUTS = {"rows": 932, "mean_probability": 0.2114, "model_version": "hgb-3f9a"}

# Where a succeeded job's task details keep its outputs (FakeVertex.plan options). The
# PipelineTaskDetail reference: parentTaskId is "The id of the parent task if the task is
# within a component scope. Empty if the task is at the root level." So the root DAG's
# tasks may name the run task as parent, or carry none; either way the run's own task may
# carry the outputs, lack them, or be missing.
OUTPUT_SHAPES = {
    "run-task": {},
    "producers-parented": {"run_task_outputs": False},
    "producers-root-level": {"run_task_outputs": False, "parent_ids": False},
    "no-run-task-parented": {"run_task": False},
    "no-run-task-root-level": {"run_task": False, "parent_ids": False},
}
PRODUCER_SHAPES = {k: v for k, v in OUTPUT_SHAPES.items() if k != "run-task"}


class VersionUrlRegistry(LocalTemplateRegistry):
    """The local registry, with versions named by Artifact Registry version URLs as on GCP.

    (The Artifact Registry implementation is another module's; this keeps these tests about
    the runner.)
    """

    def _with_url(self, version):
        return replace(version, uri=f"{REPOSITORY_URL}/{version.package}/{version.version}")

    def upload(self, package, template, tags):
        return self._with_url(super().upload(package, template, tags))

    def resolve(self, package, tag):
        return self._with_url(super().resolve(package, tag))

    def list_versions(self, package):
        return [self._with_url(v) for v in super().list_versions(package)]

    def fetch(self, version):
        return super().fetch(super().resolve(version.package, version.version))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("compiled")
    return {
        name: compile_pipeline(name, folder / f"{name}.yaml", image="ml-platform:test")
        for name in (TRAINING_PIPELINE, PREDICTION_PIPELINE)
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def vertex(clock):
    with FakeVertex(clock=clock.time) as fake:
        yield fake


@pytest.fixture
def registry(tmp_path, compiled) -> VersionUrlRegistry:
    registry = VersionUrlRegistry(tmp_path / "templates")
    for name, path in compiled.items():
        registry.upload(name, path, tags=["prod"])
    return registry


@pytest.fixture
def settings(vertex) -> Settings:
    return Settings.from_env(
        {
            "DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod",
            "ML_PLATFORM_GCP_PROJECT": vertex.project,
            "ML_PLATFORM_GCP_REGION": vertex.location,
            "ML_PLATFORM_GCS_BUCKET": "acme-ml-pipelines",
            "ML_PLATFORM_VERTEX_SERVICE_ACCOUNT": SERVICE_ACCOUNT,
            "ML_PLATFORM_VERTEX_NETWORK": NETWORK,
            "ML_PLATFORM_VERTEX_API_ENDPOINT": vertex.url,
        }
    )


def make_runner(settings, registry, **overrides) -> VertexPipelineRunner:
    # Retries back off for hundredths of a second here; production waits seconds.
    options = {
        "credentials": AnonymousCredentials(),
        "retry_initial": 0.01,
        "retry_maximum": 0.05,
        "retry_deadline": 5.0,
        **overrides,
    }
    return VertexPipelineRunner.from_settings(settings, registry, **options)


@pytest.fixture
def runner(settings, registry) -> VertexPipelineRunner:
    return make_runner(settings, registry)


def training_request(settings, registry, job_id=None) -> JobRequest:
    return JobRequest(
        job_id=job_id or make_job_id("flight_delay_model", "", RUN_ID),
        template=registry.resolve(TRAINING_PIPELINE, "prod"),
        parameters={
            "warehouse_uri": "bigquery://acme-ml",
            "features_dataset": "flights_features",
            "cutoff_date": "2013-10-01",
        },
        labels=settings.job_labels(asset="flight_delay_model", partition=None, run_id=RUN_ID),
        display_name="flight_delay_model",
    )


def prediction_request(registry) -> JobRequest:
    return JobRequest(
        job_id="flight-delay-predictions-2013-10-01-8f2c1b7a",
        template=registry.resolve(PREDICTION_PIPELINE, "prod"),
        parameters={
            "warehouse_uri": "bigquery://acme-ml",
            "features_dataset": "flights_features",
            "predictions_dataset": "flights_predictions",
            "flight_date": "2013-10-01",
            "model_uri": "gs://acme-ml-pipelines/pipeline_root/prod/model",
        },
        labels={"deployment": "prod", "asset": "flight_delay_predictions"},
    )


def run(runner, request, clock, **kwargs):
    return runner.run(request, sleep=clock.sleep, clock=clock.monotonic, **kwargs)


# -- a job that succeeds ----------------------------------------------------------------


def test_a_job_is_created_as_specified_and_its_outputs_read_like_the_local_backend(
    runner, settings, registry, vertex, clock, compiled
):
    request = training_request(settings, registry)
    vertex.plan(
        request.job_id,
        (0, "PENDING"),
        (40, "RUNNING"),
        (900, "SUCCEEDED"),
        outputs=TRAINING_OUTPUTS,
    )
    job = run(runner, request, clock)

    # What went over the wire: one look-up, one create, then gets until it ended.
    assert [r.kind for r in vertex.requests[:2]] == ["get", "create"]
    assert vertex.requests[0].status == 404
    assert {r.kind for r in vertex.requests[2:]} == {"get"}
    (create,) = vertex.calls("create")
    assert create.path == "/v1/projects/acme-ml/locations/us-central1/pipelineJobs"
    assert create.query["pipelineJobId"] == request.job_id
    body = create.body
    assert body["displayName"] == "flight_delay_model"
    assert body["labels"] == {
        "app": "ml-platform",
        "deployment": "prod",
        "asset": "flight_delay_model",
        "partition": "none",
        "dagster_run_id": RUN_ID,
    }
    assert body["serviceAccount"] == SERVICE_ACCOUNT
    assert body["network"] == NETWORK
    assert body["templateUri"] == f"{REPOSITORY_URL}/{TRAINING_PIPELINE}/{request.template.version}"
    assert body["runtimeConfig"] == {
        "gcsOutputDirectory": "gs://acme-ml-pipelines/pipeline_root/prod",
        "parameterValues": dict(request.parameters),
    }
    # The compiled spec as it is: one task, which reads the warehouse, so never cached.
    assert body["pipelineSpec"] == yaml.safe_load(compiled[TRAINING_PIPELINE].read_text())
    tasks = body["pipelineSpec"]["root"]["dag"]["tasks"]
    assert list(tasks) == ["train-and-evaluate"]
    assert tasks["train-and-evaluate"]["cachingOptions"] == {}

    assert job.state is JobState.SUCCEEDED
    assert job.job_id == request.job_id
    assert job.name == f"projects/acme-ml/locations/us-central1/pipelineJobs/{request.job_id}"
    assert job.pipeline == TRAINING_PIPELINE
    assert job.template_uri == body["templateUri"]
    assert job.template_version == request.template.version
    assert job.parameters == request.parameters
    assert dict(request.labels).items() <= job.labels.items()
    assert BILLING_LABEL in job.labels  # Vertex adds its own
    assert (job.end_time - job.start_time).total_seconds() == 860
    assert job.links["console"] == (
        "https://console.cloud.google.com/vertex-ai/locations/us-central1/pipelines/runs/"
        f"{request.job_id}?project=acme-ml"
    )
    assert "aiplatform.googleapis.com%2FPipelineJob" in job.links["logs"]
    assert f"pipeline_job_id%3D%22{request.job_id}%22" in job.links["logs"]
    assert job.links["logs"].endswith("?project=acme-ml")
    # What every pipeline-backed materialization records from it.
    metadata = job_metadata(job)
    assert metadata["template_version"] == request.template.version
    assert metadata["console_link"].value == job.links["console"]
    assert metadata["logs_link"].value == job.links["logs"]
    assert metadata["pipeline_seconds"] == 860.0

    # The outputs the assets read, in the local backend's shape.
    assert set(job.outputs) == {
        "model",
        "metrics",
        "evaluation_plot",
        "roc_auc",
        "baseline_roc_auc",
    }
    assert_training_outputs(job)


def assert_training_outputs(job) -> None:
    """The training pipeline's outputs, in the local backend's shape."""
    assert job.outputs["model"] == {
        "uri": TRAINING_OUTPUTS["model"]["uri"],
        "type": "system.Model",
        "metadata": TRAINING_OUTPUTS["model"]["metadata"],
    }
    assert job.outputs["model"]["uri"] == "gs://acme-ml-pipelines/pipeline_root/prod/model"
    assert job.outputs["metrics"]["type"] == "system.Metrics"
    assert job.outputs["metrics"]["metadata"] == TRAINING_OUTPUTS["metrics"]["metadata"]
    assert job.outputs["evaluation_plot"]["type"] == "system.Artifact"
    assert job.outputs["evaluation_plot"]["uri"].startswith(
        f"gs://acme-ml-pipelines/pipeline_root/prod/123456789012/{job.job_id}/"
    )
    assert job.outputs["roc_auc"] == 0.7782
    assert job.outputs["baseline_roc_auc"] == 0.6936


@pytest.mark.parametrize("shape", OUTPUT_SHAPES.values(), ids=OUTPUT_SHAPES.keys())
def test_output_parameters_come_back_as_their_declared_types(
    runner, settings, registry, vertex, clock, shape
):
    request = prediction_request(registry)
    vertex.plan(
        request.job_id,
        (0, "RUNNING"),
        (120, "SUCCEEDED"),
        outputs=PREDICTION_OUTPUTS,
        **shape,
    )
    job = run(runner, request, clock)
    # JSON numbers are doubles on the wire; the spec declares rows NUMBER_INTEGER.
    assert job.outputs == {"rows": 932, "mean_probability": 0.2114, "model_version": "hgb-3f9a"}
    assert type(job.outputs["rows"]) is int


@pytest.mark.parametrize("shape", PRODUCER_SHAPES.values(), ids=PRODUCER_SHAPES.keys())
def test_outputs_are_read_from_the_producing_tasks_when_the_run_record_lacks_them(
    runner, settings, registry, vertex, clock, shape
):
    request = training_request(settings, registry)
    vertex.plan(
        request.job_id,
        (0, "RUNNING"),
        (60, "SUCCEEDED"),
        outputs=TRAINING_OUTPUTS,
        **shape,
    )
    job = run(runner, request, clock)
    assert job.outputs["model"]["uri"] == TRAINING_OUTPUTS["model"]["uri"]
    assert job.outputs["metrics"]["metadata"]["roc_auc"] == 0.7782
    # Every artifact output, as when the run task carries them.
    assert_training_outputs(job)
    # The fake served the shape asked for (not, say, the default one).
    tasks = vertex.job(request.job_id)["jobDetail"]["taskDetails"]
    assert any(t["taskName"] == request.job_id for t in tasks) is shape.get("run_task", True)
    assert all(t["taskName"] == request.job_id or "parentTaskId" in t for t in tasks) is (
        shape.get("parent_ids", True)
    )


def test_tasks_nested_in_a_component_scope_are_not_taken_for_the_root_dags(
    runner, settings, registry, vertex, clock
):
    # Only tasks listed as another task's children are nested; a root task of the same name
    # (names are unique per DAG only) is the producer.
    request = training_request(settings, registry)
    vertex.plan(
        request.job_id,
        (0, "RUNNING"),
        (60, "SUCCEEDED"),
        outputs=TRAINING_OUTPUTS,
        run_task_outputs=False,
        parent_ids=False,
    )
    job = run(runner, request, clock)
    details = vertex.job(request.job_id)["jobDetail"]["taskDetails"]
    (train,) = [t for t in details if t["taskName"] == "train-and-evaluate"]
    nested = {
        **train,
        "taskId": "9001",
        "parentTaskId": train["taskId"],
        "outputs": {key: {"artifacts": [{"uri": "gs://wrong/nested"}]} for key in train["outputs"]},
    }
    data = {**vertex.job(request.job_id), "jobDetail": {"taskDetails": [*details, nested]}}
    assert runner.from_json(data).outputs == job.outputs


def test_job_level_caching_off_disables_it_for_every_task(settings, registry, vertex, clock):
    runner = make_runner(replace(settings, vertex_caching=False), registry)
    # The prediction pipeline: its model importer is cacheable as compiled, its scoring not.
    request = prediction_request(registry)
    vertex.plan(request.job_id, (0, "SUCCEEDED"), outputs=PREDICTION_OUTPUTS)
    run(runner, request, clock)
    spec = vertex.calls("create")[0].body["pipelineSpec"]
    options = {name: task["cachingOptions"] for name, task in spec["root"]["dag"]["tasks"].items()}
    assert options == {"importer": {"enableCache": False}, "score-flights": {"enableCache": False}}


# -- transient and permanent errors --------------------------------------------------------


def test_503_429_and_504_are_retried(runner, settings, registry, vertex, clock):
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "RUNNING"), (60, "SUCCEEDED"), outputs=TRAINING_OUTPUTS)
    vertex.fail_next("create", 1, 503)
    job = run(runner, request, clock)
    assert job.state is JobState.SUCCEEDED
    assert [r.status for r in vertex.calls("create")] == [503, 200]
    assert vertex.job_ids() == [request.job_id]

    vertex.fail_next("get", 1, 429)
    vertex.fail_next("get", 1, 504)
    assert runner.get(request.job_id).state is JobState.SUCCEEDED
    assert [r.status for r in vertex.calls("get")][-3:] == [429, 504, 200]


def test_a_create_whose_answer_was_lost_reattaches_instead_of_creating_twice(
    runner, settings, registry, vertex, clock
):
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "RUNNING"), (60, "SUCCEEDED"), outputs=TRAINING_OUTPUTS)
    # Vertex created the job but the answer never arrived; the retry is told it exists.
    vertex.fail_next("create", 1, 503, after_apply=True)
    job = run(runner, request, clock)
    assert job.state is JobState.SUCCEEDED
    assert [r.status for r in vertex.calls("create")] == [503, 409]
    assert vertex.job_ids() == [request.job_id]


def test_a_permanent_error_names_the_job_and_is_not_retried(
    runner, settings, registry, vertex, clock
):
    request = training_request(settings, registry)
    vertex.fail_next("create", 1, 403, message="Permission 'aiplatform.pipelineJobs.create' denied")
    with pytest.raises(VertexApiError) as failure:
        run(runner, request, clock)
    message = str(failure.value)
    assert f"create pipeline job {request.job_id}" in message
    assert "projects/acme-ml/locations/us-central1" in message
    assert "aiplatform.pipelineJobs.create' denied" in message
    assert len(vertex.calls("create")) == 1


def test_500s_in_the_middle_of_a_long_wait_are_retried(runner, settings, registry, vertex, clock):
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "RUNNING"), (4 * 3600, "SUCCEEDED"), outputs=TRAINING_OUTPUTS)
    # Two hours in (the look-up and 96 polls answered), Vertex answers 500 three times.
    vertex.fail_next("get", 3, 500, message="Internal error encountered.", skip=97)
    job = run(runner, request, clock)
    assert job.state is JobState.SUCCEEDED
    assert job.outputs["roc_auc"] == 0.7782
    statuses = [r.status for r in vertex.calls("get")]
    assert statuses[96:101] == [200, 500, 500, 500, 200]
    assert statuses.count(500) == 3 and len(statuses) > 101  # the wait went on after them
    assert len(vertex.calls("create")) == 1 and not vertex.calls("cancel")


def test_a_500_that_does_not_go_away_fails_the_wait_after_bounded_retries(
    settings, registry, vertex, clock
):
    runner = make_runner(settings, registry, retry_deadline=0.3)
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "RUNNING"), (4 * 3600, "SUCCEEDED"))
    vertex.fail_next("get", 10_000, 500, message="Internal error encountered.", skip=40)
    with pytest.raises(VertexApiError) as failure:
        run(runner, request, clock)
    message = str(failure.value)
    assert f"could not get pipeline job {request.job_id}" in message
    assert "gave up retrying transient errors (Timeout of 0.3s exceeded)" in message
    assert "500 GET" in message and "Internal error encountered." in message
    statuses = [r.status for r in vertex.calls("get")]
    assert statuses[:40] == [404] + [200] * 39
    assert 1 < statuses.count(500) < 100  # retried, and bounded by the deadline
    # The job itself is fine: it is left running, so that the step's retry reattaches.
    assert not vertex.calls("cancel")
    assert vertex.job(request.job_id)["state"] == "PIPELINE_STATE_RUNNING"


def test_transient_errors_past_the_retry_deadline_give_up_clearly(settings, registry, vertex):
    runner = make_runner(settings, registry, retry_deadline=0.3)
    vertex.fail_next("get", 1000, 503)
    with pytest.raises(VertexApiError) as failure:
        runner.get("some-job")
    message = str(failure.value)
    assert (
        "could not get pipeline job some-job in projects/acme-ml/locations/us-central1" in message
    )
    assert "gave up retrying transient errors (Timeout of 0.3s exceeded)" in message
    assert "503 GET" in message and "injected by the fake" in message
    assert len(vertex.calls("get")) > 1


# -- jobs that do not succeed ------------------------------------------------------------


def test_a_failed_job_raises_with_its_error_and_links(runner, settings, registry, vertex, clock):
    request = training_request(settings, registry)
    vertex.plan(
        request.job_id,
        (0, "RUNNING"),
        (
            300,
            "FAILED",
            "The DAG failed because some tasks failed. The failed tasks are: [train-and-evaluate].",
        ),
        failed_task=(
            "train-and-evaluate",
            "The replica workerpool0-0 exited with a non-zero status of 1.",
        ),
    )
    with pytest.raises(PipelineJobError) as failure:
        run(runner, request, clock)
    message = str(failure.value)
    assert "is FAILED" in message
    assert "The failed tasks are: [train-and-evaluate]" in message
    replica = "The replica workerpool0-0 exited with a non-zero status of 1."
    assert f"train-and-evaluate: {replica}" in message
    assert f"pipelines/runs/{request.job_id}?project=acme-ml" in message
    assert failure.value.job.state is JobState.FAILED
    assert failure.value.job.outputs == {}


def test_a_state_this_code_does_not_know_is_an_error_naming_it(settings, registry, vertex, clock):
    # A PipelineState added to the API after this code (and its client library) was written
    # reaches the client as a number: it must not be waited on as if it were QUEUED.
    vertex.add_state("PIPELINE_STATE_FROM_A_NEWER_API", 9)
    runner = make_runner(settings, registry, poll=replace(VERTEX_POLL, deadline=4 * 3600))
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "RUNNING"), (600, "PIPELINE_STATE_FROM_A_NEWER_API"))
    expected = rf"pipeline job {request.job_id} is in state 9, a PipelineState this code does not"
    with pytest.raises(PipelineJobError, match=expected) as failure:
        run(runner, request, clock)
    assert f"pipelines/runs/{request.job_id}?project=acme-ml" in str(failure.value)
    # It failed at the first poll that saw the state, and left the job as it is.
    assert clock.sleeps and sum(clock.sleeps[:-1]) < 600 <= sum(clock.sleeps)
    assert not vertex.calls("cancel")
    with pytest.raises(PipelineJobError, match=expected):
        runner.get(request.job_id)
    # A listing of every state fails the same way; the completion sensor's, of terminal
    # states filtered on the server, cannot contain the job.
    labels = {"asset": "flight_delay_model"}
    with pytest.raises(PipelineJobError, match=expected):
        list(runner.list_jobs(labels=labels))
    assert list(runner.list_jobs(labels=labels, states=TERMINAL_STATES)) == []


def test_an_unspecified_state_is_a_job_not_started_yet(runner, settings, registry, vertex, clock):
    # PIPELINE_STATE_UNSPECIFIED is the enum's default, which JSON leaves out.
    request = training_request(settings, registry)
    vertex.plan(
        request.job_id,
        (0, "UNSPECIFIED"),
        (30, "RUNNING"),
        (90, "SUCCEEDED"),
        outputs=TRAINING_OUTPUTS,
    )
    assert runner.submit(request).state is JobState.QUEUED
    assert run(runner, request, clock).state is JobState.SUCCEEDED


@pytest.mark.parametrize("state", ["CANCELLED", "PAUSED"])
def test_a_cancelled_or_paused_job_is_a_failure(runner, settings, registry, vertex, clock, state):
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "RUNNING"), (200, state))
    with pytest.raises(PipelineJobError, match=f"is {state}"):
        run(runner, request, clock)


def test_a_retry_after_a_crash_reattaches_instead_of_submitting_again(
    settings, registry, vertex, clock
):
    request = training_request(settings, registry)
    vertex.plan(
        request.job_id,
        (0, "PENDING"),
        (30, "RUNNING"),
        (600, "SUCCEEDED"),
        outputs=TRAINING_OUTPUTS,
    )
    make_runner(settings, registry).submit(request)
    clock.advance(120)  # the process died; Dagster retries the step a while later
    job = run(make_runner(settings, registry), request, clock)
    assert job.state is JobState.SUCCEEDED
    assert job.job_id == request.job_id
    assert len(vertex.calls("create")) == 1


def test_a_failed_job_is_retried_under_a_new_id(runner, settings, registry, vertex, clock):
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "RUNNING"), (60, "FAILED", "bad data"))
    vertex.plan(
        f"{request.job_id}-retry1", (0, "RUNNING"), (60, "SUCCEEDED"), outputs=TRAINING_OUTPUTS
    )
    with pytest.raises(PipelineJobError, match="bad data"):
        run(runner, request, clock)
    job = run(runner, request, clock)
    assert job.job_id == f"{request.job_id}-retry1"
    assert [r.query["pipelineJobId"] for r in vertex.calls("create")] == [
        request.job_id,
        f"{request.job_id}-retry1",
    ]


def test_an_interrupted_wait_cancels_the_job(runner, settings, registry, vertex, clock):
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "RUNNING"), (3600, "SUCCEEDED"))
    sleeps = []

    def terminated(seconds: float) -> None:
        sleeps.append(seconds)
        clock.sleep(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt  # what the Dagster step sees when its run is terminated

    with pytest.raises(KeyboardInterrupt):
        runner.run(request, sleep=terminated, clock=clock.monotonic)
    (cancel,) = vertex.calls("cancel")
    assert cancel.path.endswith(f"/pipelineJobs/{request.job_id}:cancel")
    assert cancel.body == {}
    assert runner.get(request.job_id).state is JobState.CANCELLED


def test_a_retry_after_a_terminated_run_starts_anew_instead_of_joining_the_cancel(
    runner, settings, registry, vertex, clock
):
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "RUNNING"), (3600, "SUCCEEDED"))
    vertex.cancel_delay = 600.0  # Vertex takes a while to stop a pipeline's tasks

    def terminated(seconds: float) -> None:
        clock.sleep(seconds)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(request, sleep=terminated, clock=clock.monotonic)
    assert runner.get(request.job_id).state is JobState.CANCELLING
    # The run is re-executed: the job being cancelled can only end CANCELLED, so a new one.
    vertex.plan(f"{request.job_id}-retry1", (0, "RUNNING"), (60, "SUCCEEDED"))
    assert run(runner, request, clock).job_id == f"{request.job_id}-retry1"
    assert len(vertex.calls("create")) == 2


class CredentialsThatFailOnce(AnonymousCredentials):
    """Google credentials whose token refresh fails once (the metadata server hiccups)."""

    def __init__(self, failing_call: int) -> None:
        super().__init__()
        self.calls, self.failing_call = 0, failing_call

    def before_request(self, request, method, url, headers):
        self.calls += 1
        if self.calls == self.failing_call:
            raise RefreshError("metadata server answered 503")
        return super().before_request(request, method, url, headers)


def test_losing_track_of_a_job_leaves_it_running_for_the_retry(settings, registry, vertex, clock):
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "RUNNING"), (3600, "SUCCEEDED"))
    flaky = make_runner(settings, registry, credentials=CredentialsThatFailOnce(failing_call=4))
    with pytest.raises(PipelineJobError, match=rf"get pipeline job {request.job_id}.*answered 503"):
        run(flaky, request, clock)  # look-up, create, one get, then the refresh fails
    assert not vertex.calls("cancel")  # the job itself was fine
    job = run(make_runner(settings, registry), request, clock)  # the step's retry
    assert job.job_id == request.job_id and job.state is JobState.SUCCEEDED
    assert len(vertex.calls("create")) == 1


def test_the_deadline_fails_and_cancels_the_job(settings, registry, vertex, clock):
    runner = make_runner(settings, registry, poll=replace(VERTEX_POLL, deadline=1800))
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "RUNNING"))  # never ends
    with pytest.raises(PipelineJobError, match="gave up waiting after 1800 s"):
        run(runner, request, clock)
    assert len(vertex.calls("cancel")) == 1
    assert runner.get(request.job_id).state is JobState.CANCELLED


def test_cancelling_a_job_that_ended_or_does_not_exist_is_not_an_error(
    runner, settings, registry, vertex, clock
):
    request = training_request(settings, registry)
    vertex.plan(request.job_id, (0, "SUCCEEDED"), outputs=TRAINING_OUTPUTS)
    run(runner, request, clock)
    runner.cancel(request.job_id)  # Vertex answers 400 FAILED_PRECONDITION
    runner.cancel("no-such-job")  # 404
    assert [r.status for r in vertex.calls("cancel")] == [400, 404]
    assert runner.get(request.job_id).state is JobState.SUCCEEDED
    assert runner.get("no-such-job") is None


# -- what is checked before any call ------------------------------------------------------


def test_bad_requests_are_refused_before_reaching_vertex(runner, settings, registry, vertex, clock):
    request = training_request(settings, registry)
    misspelt = {
        "warehouse_uri": "bigquery://acme-ml",
        "features_dataset": "flights_features",
        "cutof_date": "2013-10-01",
    }
    with pytest.raises(
        PipelineJobError, match="unknown parameters cutof_date; missing parameters cutoff_date"
    ):
        runner.submit(replace(request, parameters=misspelt))
    tag_url = replace(request.template, uri=f"{REPOSITORY_URL}/{TRAINING_PIPELINE}/prod")
    with pytest.raises(PipelineJobError, match="never a tag"):
        runner.submit(replace(request, template=tag_url))
    local_file = LocalTemplateRegistry(registry.root).resolve(TRAINING_PIPELINE, "prod")
    with pytest.raises(PipelineJobError, match="Artifact Registry version URL"):
        runner.submit(replace(request, template=local_file))
    assert vertex.requests == []


def test_labels_are_made_valid_for_vertex(runner, settings, registry, vertex, clock):
    assert vertex_labels({"Team": "ML Platform", "asset": "flight_delay_model"}) == {
        "team": "ml-platform",
        "asset": "flight_delay_model",
    }
    with pytest.raises(ValueError, match="both become 'team'"):
        vertex_labels({"Team": "a", "team": "b"})
    request = replace(training_request(settings, registry), labels={"Cost Center": "R&D 42"})
    vertex.plan(request.job_id, (0, "SUCCEEDED"), outputs=TRAINING_OUTPUTS)
    run(runner, request, clock)
    assert vertex.calls("create")[0].body["labels"] == {"cost_center": "r-d-42"}


# -- listing for the completion sensor ----------------------------------------------------


def test_list_jobs_filters_orders_and_pages_on_the_server(runner, vertex, clock):
    start = clock.time()
    labels = {"deployment": "prod", "asset": "flight_delay_predictions"}
    ended = {  # job id -> (state, minutes after start that it ended)
        "a-old": ("SUCCEEDED", 5),
        "b": ("SUCCEEDED", 50),
        "c": ("FAILED", 40),
        "d": ("CANCELLED", 45),
        "e": ("SUCCEEDED", 30),
        "f": ("SUCCEEDED", 20),
    }
    for job_id, (state, minutes) in ended.items():
        vertex.add_job(
            job_id, state=state, labels=labels, created=start, ended=start + minutes * 60
        )
    vertex.add_job("running", state="RUNNING", labels=labels, created=start)
    vertex.add_job(
        "other-asset",
        state="SUCCEEDED",
        labels={**labels, "asset": "flight_delay_model"},
        created=start,
        ended=start + 35 * 60,
    )
    vertex.add_job(
        "branch",
        state="SUCCEEDED",
        labels={**labels, "deployment": "branch"},
        created=start,
        ended=start + 35 * 60,
    )
    after = datetime.fromtimestamp(start + 10 * 60, UTC)

    jobs = runner.list_jobs(
        labels=labels,
        states=[JobState.SUCCEEDED, JobState.FAILED],
        ended_after=after,
        page_size=2,
    )
    assert vertex.calls("list") == []  # nothing is fetched before the caller iterates
    first = next(jobs)
    assert len(vertex.calls("list")) == 1
    rest = list(jobs)
    assert [j.job_id for j in [first, *rest]] == ["f", "e", "c", "b"]  # oldest end first
    assert [j.state for j in [first, *rest]] == [
        JobState.SUCCEEDED,
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.SUCCEEDED,
    ]
    assert first.pipeline == "flight-delay-prediction"
    assert first.outputs == {}  # the list view has no task details

    first_page, second_page = vertex.calls("list")
    assert first_page.path == "/v1/projects/acme-ml/locations/us-central1/pipelineJobs"
    assert first_page.query["filter"] == (
        'labels.deployment="prod" AND labels.asset="flight_delay_predictions" AND '
        '(state="PIPELINE_STATE_FAILED" OR state="PIPELINE_STATE_SUCCEEDED") AND '
        'end_time>"2024-03-01T09:10:00.000000Z"'
    )
    assert first_page.query["orderBy"] == "end_time"
    assert first_page.query["pageSize"] == "2"
    assert "pageToken" not in first_page.query
    mask = first_page.query["readMask"].split(",")
    assert "pipelineSpec.pipelineInfo" in mask and "labels" in mask and "endTime" in mask
    assert "pipelineSpec" not in mask and "jobDetail" not in mask
    assert second_page.query["pageToken"]
    assert {k: v for k, v in second_page.query.items() if k != "pageToken"} == {
        k: v for k, v in first_page.query.items()
    }

    assert list(runner.list_jobs(labels=labels, states=[])) == []
    assert [j.job_id for j in runner.list_jobs(labels={"deployment": "branch"})] == ["branch"]


def test_list_filters_are_built_from_the_arguments():
    assert list_filter(labels=None, states=None, ended_after=None) == ""
    assert list_filter(labels=None, states=[JobState.SUCCEEDED], ended_after=None) == (
        'state="PIPELINE_STATE_SUCCEEDED"'
    )
    with pytest.raises(ValueError, match="label rules"):
        list_filter(labels={"asset": 'x" OR state="y'}, states=None, ended_after=None)


def test_the_fake_refuses_filters_it_does_not_implement(runner, vertex):
    # So that no test can pass on a filter the fake silently ignored.
    request = types.ListPipelineJobsRequest(
        parent="projects/acme-ml/locations/us-central1", filter='display_name="x"'
    )
    with pytest.raises(exceptions.BadRequest, match="does not implement the filter term"):
        list(runner._client.list_pipeline_jobs(request=request))
    assert vertex.unsupported


# -- the goals ----------------------------------------------------------------------


def test_waiting_an_hour_makes_at_most_60_get_calls_and_starts_fast(
    runner, settings, registry, vertex, clock
):
    request = training_request(settings, registry)
    vertex.plan(
        request.job_id,
        (0, "PENDING"),
        (60, "RUNNING"),
        (3600, "SUCCEEDED"),
        outputs=TRAINING_OUTPUTS,
    )
    job = run(runner, request, clock)
    assert job.state is JobState.SUCCEEDED
    polls = len(vertex.calls("get")) - 1  # the first get is the look-up before creating
    assert polls <= 60
    assert clock.sleeps[0] == 5.0
    assert (job.end_time.timestamp() + VERTEX_POLL.max_interval) >= clock.time()


def test_importing_the_runner_loads_no_google_library():
    # Compared with what the interpreter loads at startup: a .pth file of the Google
    # packages creates the bare ``google.cloud`` namespace before any import.
    code = (
        "import json, sys; before = set(sys.modules); "
        "import ml_platform.resources.pipeline_runs.vertex; "
        "print(json.dumps(sorted(m for m in set(sys.modules) - before "
        "if m.startswith(('google', 'kfp', 'grpc', 'proto')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_runner_from_settings_uses_the_vertex_poll_policy_and_a_gcs_root(settings, registry):
    runner = VertexPipelineRunner.from_settings(settings, registry)
    assert runner.poll == VERTEX_POLL
    assert runner.pipeline_root == "gs://acme-ml-pipelines/pipeline_root/prod"
    assert runner.api_endpoint == settings.vertex_api_endpoint
    with pytest.raises(ValueError, match="gs://"):
        VertexPipelineRunner(project="p", region="r", pipeline_root="/tmp/x", registry=registry)
