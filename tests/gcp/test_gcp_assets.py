"""The Dagster assets, unchanged, on the Google Cloud backends of a branch deployment.

``flight_delay_model`` and one day of ``flight_delay_predictions`` are materialized through
Dagster (``dg.materialize`` on the asset definitions ``build_definitions`` assembles from
the branch's ``Settings.from_env``, in a temporary instance) against local stand-ins for
Google only, each reached by the real client over the wire:

- Vertex AI Pipelines: ``FakeVertex`` (the GAPIC REST client of ``VertexPipelineRunner``);
- Artifact Registry: ``FakeArtifactRegistry`` (``ArtifactRegistryTemplates``), where the
  templates are published first with ``ml_platform.launch.publish``, as CD does;
- BigQuery: bqemulator (``google-cloud-bigquery`` of ``BigQueryWarehouse``);
- GCS: fake-gcs-server (``google-cloud-storage`` of ``GcsArtifactStore``).

The test plays Vertex (``ScriptedVertex``): when a create request arrives, it does what the
job's components would do against the other stand-ins (store the model and the evaluation
plot under the job's output directory, replace the day's predictions in BigQuery through
``BigQueryWarehouse.replace_partition``) and plans the job to end with the task details a
real job records. Time on the fake passes per look at a job, so nothing waits on a clock.

Resource overrides (everything else comes from ``build_definitions(settings)``):

- ``templates``: ``ArtifactRegistryTemplates`` as ``backends.py`` builds it, plus the fake's
  ``requests`` session (the only way to reach it: it serves the real Artifact Registry
  host names) and a bearer token (production uses Application Default Credentials);
- ``pipeline_runner``: ``VertexPipelineRunner.from_settings`` as ``backends.py`` calls it,
  with that same ``templates``, plus anonymous credentials (there are no Application
  Default Credentials here, and unlike ``BigQueryWarehouse`` the runner does not go
  anonymous for a plain-http endpoint), a fast poll policy and short API retries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import dagster as dg
import pyarrow as pa
import pytest
from dagster import DagsterEventType
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from kfp.registry import ApiAuth

from ml_platform.assets.model import BEATS_BASELINE, MODEL_KEY
from ml_platform.assets.predictions import CHECKS as PREDICTION_CHECKS
from ml_platform.assets.predictions import PREDICTIONS_KEY
from ml_platform.definitions import build_definitions
from ml_platform.launch import publish
from ml_platform.pipelines import PREDICTION_PIPELINE, TRAINING_PIPELINE
from ml_platform.pipelines.model import Evaluation, plot_evaluation, predictions_schema
from ml_platform.resources.backends import open_warehouse
from ml_platform.resources.model_registry.vertex import VertexModelRegistry
from ml_platform.resources.pipeline_runs import PollPolicy
from ml_platform.resources.pipeline_runs.vertex import VertexPipelineRunner
from ml_platform.resources.templates import TemplateVersion
from ml_platform.resources.templates.artifact_registry import ArtifactRegistryTemplates
from ml_platform.settings import Deployment, Settings
from tests.gcp.bigquery_emulator import (
    LOCATION,
    PROJECT,
    Emulator,
    bigquery_warehouse,
    bq_emulator,
)
from tests.gcp.fake_artifact_registry import FakeArtifactRegistry
from tests.gcp.fake_vertex import FakeClock, FakeVertex, RecordedRequest
from tests.gcp.fake_vertex_models import FakeVertexModels
from tests.model_metrics import TRAINING_METRICS

__all__ = ["bq_emulator"]  # the session fixture, imported for pytest

REGION = "us-central1"
PR = "1187"
VERTEX_SERVICE_ACCOUNT = "vertex-pipelines@acme-ml.iam.gserviceaccount.com"
BUCKET = "acme-ml-pipelines"
REPOSITORY = "pipeline-templates"
TAG = f"pr-{PR}"  # the tag CD publishes the branch's templates under
BRANCH_IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/images/ml-platform:pr-{PR}"
PROD_IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/images/ml-platform:prod"
PIPELINE_ROOT = f"gs://{BUCKET}/pipeline_root/branch/pr-{PR}"
FEATURES = f"flights_features_pr_{PR}"
PREDICTIONS = f"flights_predictions_pr_{PR}"
PREDICTIONS_TABLE = "flight_delay_predictions"
# Written out, not computed by the code under test: no job of a branch may name one.
PROD_DATASETS = {f"flights_{layer}" for layer in ("raw", "staging", "features", "predictions")}
PROD_DATASETS |= {"flights_reporting"}
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")

DAY, OTHER_DAY, FAILED_DAY = date(2013, 10, 1), date(2013, 10, 2), date(2013, 10, 3)
TICK = 30.0  # seconds of the fake's clock per look at a job
# The runner's wait: quick polls; the deadline (real seconds) only stops a broken test.
FAST_POLL = PollPolicy(initial_interval=0.01, max_interval=0.05, backoff=1.5, deadline=60.0)

# What the real train_and_evaluate component logs (model.Evaluation), for a model that beats
# the carrier x scheduled-hour baseline (the AUC, log loss and Brier figures README.md
# reports).
EVALUATION = Evaluation(
    test_rows=46_512,
    train_rows=185_871,
    delay_rate=0.2112,
    roc_auc=0.7782,
    log_loss=0.4410,
    brier_score=0.1397,
    baseline_roc_auc=0.6936,
    baseline_log_loss=0.4978,
    baseline_brier_score=0.1630,
)
# With the out-of-time figures evaluate_out_of_time logs beside them.
METRICS = {**TRAINING_METRICS, **EVALUATION.as_dict()}
SCORED_FLIGHTS = 7  # flights of DAY the fake scoring job writes
PROBABILITIES = [0.05, 0.12, 0.2, 0.31, 0.44, 0.5, 0.73]


# -- the test plays Vertex --------------------------------------------------------------


@dataclass
class Played:
    """What one job does while it runs, and how it ends."""

    outputs: dict[str, Any] | None = None  # the pipeline's outputs, for a job that succeeds
    work: Callable[[], None] = lambda: None  # the components' effects on GCS and BigQuery
    failing_task: str = ""  # the component that fails the job ...
    error: str | None = None  # ... with this error (then the job ends FAILED)
    record: dict[str, Any] = field(default_factory=dict)  # what the test wants to look at


Script = Callable[[str, dict[str, Any]], Played]  # (job id, create body) -> the job


_CREATE = re.compile(r"^/v1/projects/[^/]+/locations/[^/]+/pipelineJobs$")
_GET = re.compile(r"^/v1/projects/[^/]+/locations/[^/]+/pipelineJobs/[^/:]+$")


class ScriptedVertex(FakeVertex):
    """``FakeVertex`` where the test plays each job when its create request arrives.

    ``scripts`` maps the job's ``asset`` label to a ``Script``. The job's work runs before
    the fake answers the create (so its effects exist before anyone can see the job end);
    if the work raises, the job fails with that error in the task that does the work, as
    a failing component fails a Vertex job. The fake's clock advances ``TICK`` seconds on
    every get of a job, so a job planned to end after two ticks ends on the second poll.
    """

    def __init__(self, clock: FakeClock, **kwargs: Any) -> None:
        super().__init__(clock=clock.time, **kwargs)
        self.fake_clock = clock
        self.scripts: dict[str, Script] = {}
        self.played: dict[str, Played] = {}
        self._play_lock = threading.Lock()

    def handle(self, method: str, target: str, raw_body: bytes) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(target)
        if method == "GET" and _GET.match(parts.path):
            self.fake_clock.advance(TICK)
        if method == "POST" and _CREATE.match(parts.path):
            with self._play_lock:
                answer = self._play(parts.query, raw_body)
            if answer is not None:
                return answer
        return super().handle(method, target, raw_body)

    def _play(self, query: str, raw_body: bytes) -> tuple[int, dict[str, Any]] | None:
        job_id = dict(parse_qsl(query)).get("pipelineJobId", "")
        try:
            body = json.loads(raw_body)
        except ValueError:
            return None  # the fake answers INVALID_ARGUMENT
        if not isinstance(body, dict) or job_id in self.job_ids():
            return None  # the fake answers INVALID_ARGUMENT or ALREADY_EXISTS
        asset = body.get("labels", {}).get("asset", "")
        try:
            played = self.scripts[asset](job_id, body)
        except Exception as error:  # no script, or a script that breaks: say so, not hang
            message = f"the test cannot play a job of asset {asset!r}: {error!r}"
            return 500, {"error": {"code": 500, "message": message, "status": "INTERNAL"}}
        self.played[job_id] = played
        if played.error is None:
            try:
                played.work()
            except Exception as error:  # a component that raises fails the job
                played.error = f"{type(error).__name__}: {error}"
        if played.error is None:
            self.plan(job_id, (0, "RUNNING"), (2 * TICK, "SUCCEEDED"), outputs=played.outputs)
        else:
            self.plan(
                job_id,
                (0, "RUNNING"),
                (2 * TICK, "FAILED"),
                failed_task=(played.failing_task, played.error),
            )
        return None


def producer(spec: dict[str, Any], output: str) -> str:
    """The task of the compiled pipeline that produces one of its outputs."""
    outputs = spec["root"]["dag"]["outputs"]
    if output in outputs.get("artifacts", {}):
        return outputs["artifacts"][output]["artifactSelectors"][0]["producerSubtask"]
    return outputs["parameters"][output]["valueFromParameter"]["producerSubtask"]


def gcs_put(client: storage.Client, uri: str, data: bytes, content_type: str) -> None:
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    client.bucket(bucket).blob(name).upload_from_string(data, content_type=content_type)


def gcs_get(client: storage.Client, uri: str) -> bytes:
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return client.bucket(bucket).blob(name).download_as_bytes()


def training_job(gcs: storage.Client, vertex: FakeVertex, plot: bytes) -> Script:
    """The training pipeline: the model and the evaluation plot under the job's output
    directory (Vertex's layout: ROOT/PROJECT_NUMBER/JOB_ID/TASK_EXECUTION/OUTPUT_KEY)."""

    def play(job_id: str, body: dict[str, Any]) -> Played:
        spec = body["pipelineSpec"]
        base = f"{body['runtimeConfig']['gcsOutputDirectory']}/{vertex.project_number}/{job_id}"
        model_uri = f"{base}/{producer(spec, 'model')}_101/model"
        plot_uri = f"{base}/{producer(spec, 'evaluation_plot')}_102/evaluation_plot"
        model_bytes = f"flight-delay model trained by {job_id}".encode()
        version = f"sha256:{hashlib.sha256(model_bytes).hexdigest()}"

        def work() -> None:
            gcs_put(gcs, model_uri, model_bytes, "application/octet-stream")
            gcs_put(gcs, plot_uri, plot, "image/png")

        outputs = {
            "model": {
                "uri": model_uri,
                "metadata": {
                    "version": version,
                    "framework": "scikit-learn 1.6.1",
                    "train_rows": EVALUATION.train_rows,
                    "iterations": 87,
                },
            },
            "metrics": {"metadata": METRICS},
            "evaluation_plot": {"uri": plot_uri, "metadata": {"mime_type": "image/png"}},
            "roc_auc": EVALUATION.roc_auc,
            "baseline_roc_auc": EVALUATION.baseline_roc_auc,
        }
        record = {"model_uri": model_uri, "plot_uri": plot_uri, "model_version": version}
        return Played(outputs=outputs, work=work, record=record)

    return play


def scoring_job(gcs: storage.Client) -> Script:
    """The prediction pipeline: read the model artifact, then replace the day's rows
    through the warehouse its ``warehouse_uri`` parameter names (as score_flights does)."""

    def play(job_id: str, body: dict[str, Any]) -> Played:
        parameters = body["runtimeConfig"]["parameterValues"]
        day = date.fromisoformat(parameters["flight_date"])
        record: dict[str, Any] = {}

        def work() -> None:
            model = gcs_get(gcs, parameters["model_uri"])
            record["model_version"] = f"sha256:{hashlib.sha256(model).hexdigest()}"
            rows = predictions(day, PROBABILITIES, record["model_version"], job_id)
            written = open_warehouse(parameters["warehouse_uri"]).replace_partition(
                parameters["predictions_dataset"],
                parameters["predictions_table"],
                "flight_date",
                day,
                rows,
            )
            played.outputs = {
                "rows": written,
                "mean_probability": sum(PROBABILITIES) / len(PROBABILITIES),
                "model_version": record["model_version"],
            }

        played = Played(work=work, failing_task=producer(body["pipelineSpec"], "rows"))
        played.record = record
        return played

    return play


def failing_scoring_job(job_id: str, body: dict[str, Any]) -> Played:
    """A prediction job whose scoring component fails before it touches the warehouse."""
    model_uri = body["runtimeConfig"]["parameterValues"]["model_uri"]
    return Played(
        failing_task=producer(body["pipelineSpec"], "rows"),
        error=f"ModelArtifactError: model artifact {model_uri} is corrupt: pickle data was "
        "truncated",
    )


def predictions(day: date, probabilities: list[float], version: str, job: str) -> pa.Table:
    """Rows in the predictions table's schema, as the scoring component writes them."""
    count = len(probabilities)
    return pa.table(
        {
            "flight_key": [f"{day}|UA|{1500 + i}|EWR|{600 + i}" for i in range(count)],
            "flight_date": [day] * count,
            "delay_probability": probabilities,
            "model_version": [version] * count,
            "pipeline_job": [job] * count,
            "scored_at": [datetime(2024, 3, 1, 9, 5)] * count,
        },
        schema=predictions_schema(),
    )


# -- the deployment ---------------------------------------------------------------------


@dataclass
class Platform:
    settings: Settings
    defs: dg.Definitions
    resources: dict[str, Any]
    instance: dg.DagsterInstance
    vertex: ScriptedVertex
    registry: FakeArtifactRegistry
    templates: ArtifactRegistryTemplates
    published: dict[str, TemplateVersion]
    gcs: storage.Client
    emulator: Emulator

    def materialize(
        self, key: dg.AssetKey, partition: date | None = None
    ) -> dg.ExecuteInProcessResult:
        """Materialize one asset (and one partition) of the code location's graph.

        The selection is what the code location's jobs select: the model with its own
        blocking check (train_flight_delay_model), the predictions without the dbt source
        tests on them (score_flights; those run with refresh_reporting).
        """
        selection = dg.AssetSelection.assets(key)
        if key == PREDICTIONS_KEY:  # its own checks, not dbt's source tests on its table
            own = [dg.AssetCheckKey(PREDICTIONS_KEY, name) for name in PREDICTION_CHECKS]
            selection = selection.without_checks() | dg.AssetSelection.checks(*own)
        return dg.materialize(
            self.defs.assets,
            selection=selection,
            partition_key=partition.isoformat() if partition else None,
            resources=self.resources,
            instance=self.instance,
            raise_on_error=False,
        )

    def create_request(self, run_id: str) -> RecordedRequest:
        """The one create request of a Dagster run."""
        found = [
            r
            for r in self.vertex.calls("create")
            if r.body.get("labels", {}).get("dagster_run_id") == run_id
        ]
        assert len(found) == 1, f"run {run_id} sent {len(found)} create requests, not one"
        return found[0]


@pytest.fixture(scope="module")
def evaluation_plot(tmp_path_factory) -> bytes:
    """The PNG the real train_and_evaluate component would store, from the project's plot code."""
    path = tmp_path_factory.mktemp("plot") / "evaluation.png"
    curves = {
        "model_roc": ([0.0, 0.1, 0.3, 1.0], [0.0, 0.4, 0.75, 1.0]),
        "baseline_roc": ([0.0, 0.2, 0.5, 1.0], [0.0, 0.35, 0.7, 1.0]),
        "calibration": ([0.05, 0.2, 0.5], [0.06, 0.21, 0.48]),
    }
    plot_evaluation(EVALUATION, curves, path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def platform(
    bq_emulator: Emulator, gcs: storage.Client, evaluation_plot: bytes, tmp_path_factory
) -> Iterator[Platform]:
    root: Path = tmp_path_factory.mktemp("branch")
    (root / "dagster_home").mkdir()
    with (
        ScriptedVertex(FakeClock(), project=PROJECT, location=REGION) as vertex,
        FakeVertexModels(PROJECT, REGION) as models,
        FakeArtifactRegistry(project=PROJECT, location=REGION, repository=REPOSITORY) as registry,
        dg.instance_for_test(temp_dir=str(root / "dagster_home")) as instance,
    ):
        settings = Settings.from_env(
            {
                "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT": "1",
                "DAGSTER_CLOUD_DEPLOYMENT_NAME": f"pr-{PR}",
                "DAGSTER_CLOUD_PULL_REQUEST_ID": PR,
                "DAGSTER_CLOUD_GIT_SHA": "3f9a1c2",
                "ML_PLATFORM_GCP_PROJECT": PROJECT,
                "ML_PLATFORM_GCP_REGION": REGION,
                "ML_PLATFORM_BIGQUERY_LOCATION": LOCATION,
                "ML_PLATFORM_GCS_BUCKET": BUCKET,
                "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": REPOSITORY,
                "ML_PLATFORM_VERTEX_SERVICE_ACCOUNT": VERTEX_SERVICE_ACCOUNT,
                "ML_PLATFORM_TEMPLATE_TAG": TAG,
                "ML_PLATFORM_COMPONENT_IMAGE": BRANCH_IMAGE,
                "ML_PLATFORM_VERTEX_API_ENDPOINT": vertex.url,
                "ML_PLATFORM_BIGQUERY_API_ENDPOINT": bq_emulator.endpoint,
                "ML_PLATFORM_DATA_DIR": str(root / "data"),
                "DAGSTER_HOME": str(root / "dagster_home"),
            }
        )
        assert settings.deployment is Deployment.BRANCH
        defs = build_definitions(settings)

        # backends.py's ArtifactRegistryTemplates, plus the way to reach the fake.
        templates = ArtifactRegistryTemplates(
            settings.artifact_registry_url,
            auth=ApiAuth("test-token"),
            session=registry.session(),
            timeout=10.0,
            backoff=0.01,
        )
        # CD: prod's build under the prod tag, then the branch's build under the branch's.
        prod = {
            pipeline: publish(
                replace(settings, component_image=PROD_IMAGE), templates, pipeline, ["prod"]
            )
            for pipeline in (TRAINING_PIPELINE, PREDICTION_PIPELINE)
        }
        published = {
            pipeline: publish(settings, templates, pipeline, [settings.template_tag])
            for pipeline in (TRAINING_PIPELINE, PREDICTION_PIPELINE)
        }
        # backends.py's VertexPipelineRunner.from_settings, with credentials and fast polls.
        runner = VertexPipelineRunner.from_settings(
            settings,
            templates,
            credentials=AnonymousCredentials(),
            poll=FAST_POLL,
            retry_initial=0.01,
            retry_maximum=0.05,
            retry_deadline=5.0,
        )
        # backends.py's model registry, on the fake ModelService (its own local endpoint).
        model_registry = VertexModelRegistry.from_settings(settings, api_endpoint=models.url)
        resources = {
            **defs.resources,
            "templates": templates,
            "pipeline_runner": runner,
            "model_registry": model_registry,
        }
        for pipeline, version in published.items():
            assert version.version != prod[pipeline].version, "the two builds must differ"
            assert version.tags == (TAG,), f"{pipeline} {version.version}: {version.tags}"

        vertex.scripts = {
            "flight_delay_model": training_job(gcs, vertex, evaluation_plot),
            "flight_delay_predictions": scoring_job(gcs),
        }
        # Another day already scored: the asset must count its own day's rows only.
        other = predictions(OTHER_DAY, [0.3, 0.4, 0.5], "sha256:earlier", "an-earlier-job")
        bigquery_warehouse(bq_emulator.endpoint).replace_partition(
            PREDICTIONS, PREDICTIONS_TABLE, "flight_date", OTHER_DAY, other
        )
        # The day's flights in the features, which the predictions' checks count against.
        flights = pa.table(
            {
                "flight_key": [f"{DAY}|F{i}" for i in range(SCORED_FLIGHTS)],
                "flight_date": pa.array([DAY] * SCORED_FLIGHTS, pa.date32()),
            }
        )
        bigquery_warehouse(bq_emulator.endpoint).replace_partition(
            FEATURES, "flight_features", "flight_date", DAY, flights
        )
        yield Platform(
            settings,
            defs,
            resources,
            instance,
            vertex,
            registry,
            templates,
            published,
            gcs,
            bq_emulator,
        )
        assert not vertex.unsupported, f"requests the fake Vertex refused: {vertex.unsupported}"


@pytest.fixture(scope="module")
def trained(platform: Platform) -> dg.ExecuteInProcessResult:
    result = platform.materialize(MODEL_KEY)
    assert result.success, f"materializing flight_delay_model failed:\n{failure_text(result)}"
    return result


# -- helpers ---------------------------------------------------------------------------


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """Every step failure's error, with its causes and contexts."""
    lines = []
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        seen = []
        while error is not None and error not in seen:
            seen.append(error)
            lines.append(error.message.strip())
            error = error.cause or error.context
    return "\n".join(lines)


def only_materialization(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    """The metadata values of the run's one materialization (links checked to be URLs)."""
    events = result.get_asset_materialization_events()
    assert len(events) == 1, f"expected one materialization, got {len(events)}"
    metadata = events[0].materialization.metadata
    for name in ("console_link", "logs_link"):
        assert isinstance(metadata.get(name), dg.UrlMetadataValue), f"{name}: {metadata.get(name)}"
    return {name: value.value for name, value in metadata.items()}


def assert_branch_job(
    create: RecordedRequest, platform: Platform, *, pipeline: str, labels: dict[str, str]
) -> None:
    """What every job of the branch must look like on the wire."""
    body = create.body
    version = platform.published[pipeline]
    # Submitted by the sha256 version the branch's tag resolved to, never by a tag.
    assert version.version.startswith("sha256:")
    assert body["templateUri"] == (
        f"https://{REGION}-kfp.pkg.dev/{PROJECT}/{REPOSITORY}/{pipeline}/{version.version}"
    ), f"template_uri must be the version URL of {TAG}, got {body['templateUri']}"
    assert TAG not in body["templateUri"] and "prod" not in body["templateUri"]
    assert platform.registry.requests_to(f"/packages/{pipeline}/tags/{TAG}"), (
        f"the tag {TAG} of {pipeline} was never looked up in Artifact Registry"
    )
    executors = body["pipelineSpec"]["deploymentSpec"]["executors"].values()
    images = {e["container"]["image"] for e in executors if "container" in e}
    assert images == {BRANCH_IMAGE}, f"the job runs the branch's build, not {images}"
    assert body["pipelineSpec"]["pipelineInfo"]["name"] == pipeline
    sent = dict(body["labels"])
    # A digest of the job's inputs (template version and parameters): same work, same label.
    assert re.fullmatch(r"[0-9a-f]{16}", sent.pop("inputs", "")), body["labels"]
    assert sent == {
        "app": "ml-platform",
        "deployment": "branch",
        "pull_request": PR,
        **labels,
    }, f"labels of the {pipeline} job: {body['labels']}"
    assert all(LABEL_VALUE.match(value) for value in body["labels"].values())
    assert body["runtimeConfig"]["gcsOutputDirectory"] == PIPELINE_ROOT
    values = body["runtimeConfig"]["parameterValues"]
    assert values["warehouse_uri"].startswith(f"bigquery://{PROJECT}?location={LOCATION}"), values
    assert values["features_dataset"] == FEATURES
    named = {v for v in values.values() if isinstance(v, str) and v.startswith("flights_")}
    assert not named & PROD_DATASETS, f"a branch job names a prod dataset: {named}"
    assert all(name.endswith(f"_pr_{PR}") for name in named), named


# -- the model --------------------------------------------------------------------------


def test_model_job_goes_to_vertex_as_the_branchs_job(platform, trained):
    create = platform.create_request(trained.run_id)
    job_id = create.query["pipelineJobId"]
    assert job_id == f"flight-delay-model-{trained.run_id}", job_id
    assert create.path == f"/v1/projects/{PROJECT}/locations/{REGION}/pipelineJobs"
    assert_branch_job(
        create,
        platform,
        pipeline=TRAINING_PIPELINE,
        labels={
            "asset": "flight_delay_model",
            "partition": "none",
            "dagster_run_id": trained.run_id,
        },
    )
    assert create.body["runtimeConfig"]["parameterValues"] == {
        "warehouse_uri": platform.resources["warehouse"].uri,
        "features_dataset": FEATURES,
        "cutoff_date": "2013-10-01",
        "champion_model_uri": "",  # the first model: no champion to re-score
        "max_iter": 300,
    }
    # The run looked the job up first, created it once and polled it until it ended.
    mine = [r for r in platform.vertex.requests if job_id in r.path or r is create]
    assert [r.kind for r in mine[:2]] == ["get", "create"] and mine[0].status == 404
    assert {r.kind for r in mine[2:]} == {"get"} and len(mine) >= 4
    assert platform.vertex.job(job_id)["state"] == "PIPELINE_STATE_SUCCEEDED"


def test_model_materialization_records_the_jobs_results(platform, trained):
    create = platform.create_request(trained.run_id)
    job_id = create.query["pipelineJobId"]
    played = platform.vertex.played[job_id].record
    version = platform.published[TRAINING_PIPELINE]
    metadata = only_materialization(trained)

    assert metadata["model_uri"] == played["model_uri"]
    assert metadata["model_uri"].startswith(f"{PIPELINE_ROOT}/"), metadata["model_uri"]
    assert metadata["model_version"] == played["model_version"]
    assert metadata["cutoff_date"] == "2013-10-01"
    for name, value in METRICS.items():
        if not name.startswith("oot_score_q"):  # the drift reference lives in the registry
            assert metadata[name] == pytest.approx(value), f"metric {name}: {metadata.get(name)}"
    # Registered in the pull request's own Vertex model, and its first champion.
    assert metadata["promoted"] is True and metadata["registry_version"] == "1"
    champion = platform.resources["model_registry"].get("champion")
    assert champion.artifact_uri == metadata["model_uri"] and champion.metrics == METRICS
    assert metadata[BEATS_BASELINE] is True
    assert metadata["template_version"] == version.version
    assert metadata["template_uri"] == create.body["templateUri"]
    assert (
        metadata["pipeline_job"] == f"projects/{PROJECT}/locations/{REGION}/pipelineJobs/{job_id}"
    )
    assert metadata["pipeline_job_id"] == job_id
    assert metadata["pipeline_seconds"] == 2 * TICK  # RUNNING at create, SUCCEEDED 2 ticks on
    assert metadata["console_link"] == (
        f"https://console.cloud.google.com/vertex-ai/locations/{REGION}/pipelines/runs/"
        f"{job_id}?project={PROJECT}"
    )
    assert f"pipeline_job_id%3D%22{job_id}%22" in metadata["logs_link"]
    assert metadata["logs_link"].endswith(f"?project={PROJECT}")
    # The plot was read back from GCS and embedded, byte for byte.
    assert metadata["evaluation_plot_uri"] == played["plot_uri"]
    stored = gcs_get(platform.gcs, played["plot_uri"])
    assert stored.startswith(b"\x89PNG\r\n\x1a\n")
    embedded = re.fullmatch(
        r"!\[evaluation\]\(data:image/png;base64,(.+)\)", metadata["evaluation_plot"]
    )
    assert embedded, f"evaluation_plot is not an embedded PNG: {metadata['evaluation_plot'][:80]}"
    assert base64.b64decode(embedded[1]) == stored


def test_model_blocking_check_passes_for_a_model_that_beats_the_baseline(platform, trained):
    evaluations = {e.check_name: e for e in trained.get_asset_check_evaluations()}
    assert set(evaluations) == {BEATS_BASELINE, "beats_champion"}
    evaluation = evaluations[BEATS_BASELINE]
    assert evaluation.asset_key == MODEL_KEY
    assert evaluation.passed, f"beats_baseline failed: {evaluation.description}"
    assert evaluation.blocking and evaluations["beats_champion"].passed  # no champion before
    assert evaluation.metadata["oot_roc_auc"].value == pytest.approx(METRICS["oot_roc_auc"])
    assert evaluation.metadata["oot_baseline_roc_auc"].value == pytest.approx(
        METRICS["oot_baseline_roc_auc"]
    )
    assert evaluation.description == "out-of-time ROC AUC 0.6613 vs baseline 0.6011"
    # The instance keeps it: the predictions ask the instance, not this result.
    record = platform.instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [evaluation.asset_check_key]
    )[evaluation.asset_check_key]
    assert record.run_id == trained.run_id
    assert record.event.asset_check_evaluation.passed


# -- the predictions --------------------------------------------------------------------


def test_a_day_of_predictions_is_scored_on_vertex_into_the_branchs_dataset(platform, trained):
    model = only_materialization(trained)
    result = platform.materialize(PREDICTIONS_KEY, DAY)
    assert result.success, f"scoring {DAY} failed:\n{failure_text(result)}"

    create = platform.create_request(result.run_id)
    job_id = create.query["pipelineJobId"]
    assert job_id == f"flight-delay-predictions-{DAY}-{result.run_id}", job_id
    assert_branch_job(
        create,
        platform,
        pipeline=PREDICTION_PIPELINE,
        labels={
            "asset": "flight_delay_predictions",
            "partition": DAY.isoformat(),
            "dagster_run_id": result.run_id,
        },
    )
    assert create.body["runtimeConfig"]["parameterValues"] == {
        "warehouse_uri": platform.resources["warehouse"].uri,
        "features_dataset": FEATURES,
        "predictions_dataset": PREDICTIONS,
        "predictions_table": PREDICTIONS_TABLE,
        "flight_date": DAY.isoformat(),
        "days": 1,  # one day: a backfill of a range would be one job with days=N
        "model_uri": model["model_uri"],
    }

    warehouse = bigquery_warehouse(platform.emulator.endpoint)
    stored = warehouse.row_count(PREDICTIONS, PREDICTIONS_TABLE, column="flight_date", value=DAY)
    assert stored == SCORED_FLIGHTS, f"{stored} rows for {DAY} in the emulator"
    total = warehouse.row_count(PREDICTIONS, PREDICTIONS_TABLE)
    assert total == SCORED_FLIGHTS + 3, f"the other day's rows must stay: {total} rows in all"

    metadata = only_materialization(result)
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.partition == DAY.isoformat()
    assert metadata["dagster/row_count"] == stored
    assert metadata["model_version"] == model["model_version"]
    assert metadata["model_uri"] == model["model_uri"]
    assert metadata["mean_delay_probability"] == round(sum(PROBABILITIES) / len(PROBABILITIES), 4)
    # Scored with the champion the registry named when the step started, and recorded so.
    assert metadata["registry_version"] == "1"
    assert metadata["template_version"] == platform.published[PREDICTION_PIPELINE].version
    assert metadata["pipeline_job_id"] == job_id
    assert metadata["console_link"].endswith(f"/pipelines/runs/{job_id}?project={PROJECT}")
    assert job_id in metadata["logs_link"]


def test_a_failed_prediction_job_fails_the_step_and_records_nothing(platform, trained, monkeypatch):
    monkeypatch.setitem(platform.vertex.scripts, "flight_delay_predictions", failing_scoring_job)
    model = only_materialization(trained)
    result = platform.materialize(PREDICTIONS_KEY, FAILED_DAY)

    assert not result.success, "a FAILED Vertex job must fail the Dagster step"
    create = platform.create_request(result.run_id)
    job_id = create.query["pipelineJobId"]
    assert platform.vertex.job(job_id)["state"] == "PIPELINE_STATE_FAILED"
    text = failure_text(result)
    assert f"pipeline job {job_id} ({PREDICTION_PIPELINE}) is FAILED" in text, text
    assert (
        f"score-flights: ModelArtifactError: model artifact {model['model_uri']} is corrupt" in text
    ), f"the failing component's error is missing from the step failure:\n{text}"
    console = (
        f"https://console.cloud.google.com/vertex-ai/locations/{REGION}/pipelines/runs/"
        f"{job_id}?project={PROJECT}"
    )
    assert console in text, f"the console link is missing from the step failure:\n{text}"

    # No materialization, no metadata, no rows.
    assert result.get_asset_materialization_events() == []
    written = platform.instance.all_logs(
        result.run_id, of_type={DagsterEventType.ASSET_MATERIALIZATION}
    )
    assert written == [], f"the failed run recorded {len(written)} materializations"
    assert FAILED_DAY.isoformat() not in platform.instance.get_materialized_partitions(
        PREDICTIONS_KEY
    )
    warehouse = bigquery_warehouse(platform.emulator.endpoint)
    assert (
        warehouse.row_count(PREDICTIONS, PREDICTIONS_TABLE, column="flight_date", value=FAILED_DAY)
        == 0
    )
    # The job ended by itself: nothing to cancel.
    assert not platform.vertex.calls("cancel")
