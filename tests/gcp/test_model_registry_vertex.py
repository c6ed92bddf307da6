"""The model registry contract, run against both backends, and the Vertex backend's wire.

The contract tests run each test on ``LocalModelRegistry`` (SQLite) and on
``VertexModelRegistry``, whose real GAPIC ``ModelServiceClient`` (REST transport,
anonymous credentials) talks HTTP to ``FakeVertexModels``: nothing of ours is mocked. The
wire tests then check what the Vertex backend sends and how it takes Vertex's answers.
"""

import json
import math
import subprocess
import sys
import textwrap

import pytest
from google.auth.credentials import AnonymousCredentials

from ml_platform.resources.model_registry import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    ModelRegistryError,
    promote,
)
from ml_platform.resources.model_registry.local import LocalModelRegistry
from ml_platform.resources.model_registry.vertex import (
    DESCRIPTION_FORMAT,
    VertexModelRegistry,
    model_id_for,
)
from ml_platform.settings import PROJECT_DIR, Settings
from tests.gcp.fake_vertex_models import FakeVertexModels

MODEL_ID = "flight-delay-pr-7"
IMAGE = "us-central1-docker.pkg.dev/acme-ml/images/ml-platform@sha256:" + "1" * 64
TEMPLATE = "sha256:" + "ab" * 32
RUN = "8f2c1b7a-0d4e-4c55-9a3b-1e2f3a4b5c6d"
# Floats whose decimal forms are long, tiny, huge or negative: they must come back as the
# same doubles, not as rounded decimals.
METRICS = {
    "roc_auc": 0.1 + 0.2,
    "baseline_roc_auc": 2 / 3,
    "log_loss": math.pi,
    "tiny": 5e-324,
    "huge": 1.7976931348623157e308,
    "negative": -123456789.12345679,
    "whole": 202.0,
}


def make_vertex(fake: FakeVertexModels, **overrides) -> VertexModelRegistry:
    # Retries and polls wait hundredths of a second here; production waits seconds.
    options = {
        "project": fake.project,
        "region": fake.location,
        "model_id": MODEL_ID,
        "serving_image": IMAGE,
        "api_endpoint": fake.url,
        "credentials": AnonymousCredentials(),
        "retry_initial": 0.01,
        "retry_maximum": 0.05,
        "retry_deadline": 5.0,
        "poll_initial": 0.01,
        "poll_maximum": 0.05,
        **overrides,
    }
    return VertexModelRegistry(**options)


@pytest.fixture
def fake():
    with FakeVertexModels() as server:
        yield server


@pytest.fixture(params=["local", "vertex"])
def registry(request, tmp_path):
    if request.param == "local":
        yield LocalModelRegistry(tmp_path / "registry.sqlite")
    else:
        with FakeVertexModels() as server:
            yield make_vertex(server)
            # Whatever a contract test did, it was within what the fake models.
            assert server.unsupported == []


@pytest.fixture
def vertex(fake) -> VertexModelRegistry:
    return make_vertex(fake)


def register(registry, n: int, aliases=(), metrics=None):
    return registry.register(
        f"gs://acme-ml-pipelines/pipeline_root/branch/pr-7/run-{n}/model/model.joblib",
        metrics=metrics if metrics is not None else {"roc_auc": 0.7 + n / 100},
        cutoff="2013-10-01",
        data_fingerprint=f"{n:064x}",
        template_version=TEMPLATE,
        dagster_run=f"run-{n}",
        aliases=aliases,
    )


# -- the contract, on both backends --------------------------------------------------------


def test_the_first_and_second_versions_are_numbered_and_take_their_aliases(registry):
    first = register(registry, 1, aliases=(CHAMPION,))
    second = register(registry, 2)
    assert (first.version, first.aliases) == ("1", (CHAMPION,))
    assert (second.version, second.aliases) == ("2", ())
    assert first.created is not None and second.created >= first.created


def test_a_version_is_found_by_its_id_and_by_its_alias(registry):
    first = register(registry, 1, aliases=(CHAMPION,))
    register(registry, 2)
    assert registry.get("1") == first
    assert registry.get(CHAMPION) == first
    assert registry.get("2").artifact_uri.endswith("/run-2/model/model.joblib")


def test_an_unknown_version_or_alias_is_none(registry):
    assert registry.get("1") is None  # nothing registered yet
    assert registry.get(CHAMPION) is None
    register(registry, 1)
    assert registry.get("9") is None
    assert registry.get("staging") is None
    assert registry.get("Not an alias!") is None


def test_moving_an_alias_takes_it_from_its_old_holder(registry):
    register(registry, 1, aliases=(CHAMPION, "reviewed"))
    register(registry, 2)
    moved = registry.move_alias(CHAMPION, "2")
    assert (moved.version, moved.aliases) == ("2", (CHAMPION,))
    assert registry.get("1").aliases == ("reviewed",)
    assert registry.get(CHAMPION).version == "2"
    # Moving it where it already is changes nothing.
    assert registry.move_alias(CHAMPION, "2").aliases == (CHAMPION,)


def test_aliases_given_at_registration_move_to_the_new_version(registry):
    register(registry, 1, aliases=("latest",))
    register(registry, 2, aliases=("latest",))
    assert registry.get("latest").version == "2"
    assert registry.get("1").aliases == ()


def test_versions_are_listed_oldest_first(registry):
    assert registry.list_versions() == []
    for n in range(1, 4):
        register(registry, n)
    listed = registry.list_versions()
    assert [v.version for v in listed] == ["1", "2", "3"]
    assert [v.dagster_run for v in listed] == ["run-1", "run-2", "run-3"]
    assert listed == [registry.get(v) for v in ("1", "2", "3")]


def test_metrics_and_provenance_come_back_exactly(registry):
    registered = register(registry, 1, metrics=METRICS)
    for found in (registered, registry.get("1"), registry.list_versions()[0]):
        assert dict(found.metrics) == METRICS
        assert all(
            math.copysign(1, found.metrics[k]) == math.copysign(1, v) for k, v in METRICS.items()
        )
        assert found.artifact_uri == (
            "gs://acme-ml-pipelines/pipeline_root/branch/pr-7/run-1/model/model.joblib"
        )
        assert found.cutoff == "2013-10-01"
        assert found.data_fingerprint == f"{1:064x}"
        assert found.template_version == TEMPLATE
        assert found.dagster_run == "run-1"


def test_promote_keeps_the_previous_champion_for_rollback(registry):
    register(registry, 1, aliases=(CHAMPION,))
    register(registry, 2)
    new, old = promote(registry, "2")
    assert (new.version, new.aliases) == ("2", (CHAMPION,))
    assert old.version == "1"
    assert registry.get(PREVIOUS_CHAMPION).version == "1"
    # Rolling back is promoting the previous champion.
    new, old = promote(registry, registry.get(PREVIOUS_CHAMPION).version)
    assert (new.version, old.version) == ("1", "2")
    assert registry.get(PREVIOUS_CHAMPION).version == "2"
    with pytest.raises(ModelRegistryError, match="no version '7'"):
        promote(registry, "7")


def test_the_first_promotion_has_no_previous_champion(registry):
    register(registry, 1)
    new, old = promote(registry, "1")
    assert new.aliases == (CHAMPION,) and old is None
    assert registry.get(PREVIOUS_CHAMPION) is None


@pytest.mark.parametrize("alias", ["Champion", "1st", "champion-", "a", "12", "with space"])
def test_an_invalid_alias_is_refused(registry, alias):
    with pytest.raises(ModelRegistryError, match="invalid alias"):
        register(registry, 1, aliases=(alias,))
    assert registry.list_versions() == []
    register(registry, 1)
    with pytest.raises(ModelRegistryError, match="invalid alias"):
        registry.move_alias(alias, "1")


def test_moving_an_alias_to_a_version_that_does_not_exist_is_an_error(registry):
    register(registry, 1, aliases=(CHAMPION,))
    for version in ("2", CHAMPION):
        with pytest.raises(ModelRegistryError, match=f"no version '{version}'"):
            registry.move_alias(PREVIOUS_CHAMPION, version)
    assert registry.get(PREVIOUS_CHAMPION) is None


def test_two_processes_registering_at_once_get_distinct_versions(tmp_path):
    path = tmp_path / "registry.sqlite"
    # The workers go in rounds: round n starts once both finished round n - 1 (there are
    # 2n versions), so every round is two registrations racing for the next version. A
    # registration takes well under a millisecond: left alone, one worker often finished
    # before the other had started.
    code = textwrap.dedent(
        """
        import sys, time
        from ml_platform.resources.model_registry.local import LocalModelRegistry

        path, name = sys.argv[1], sys.argv[2]
        registry = LocalModelRegistry(path)
        for n in range(20):
            deadline = time.monotonic() + 60
            while len(registry.list_versions()) < 2 * n and time.monotonic() < deadline:
                time.sleep(0.0002)
            version = registry.register(
                f"gs://bucket/{name}/{n}/model.joblib",
                metrics={"roc_auc": n / 20},
                cutoff="2013-10-01",
                data_fingerprint=name,
                template_version="sha256:0",
                dagster_run=f"{name}-{n}",
                aliases=("latest",),
            )
            print(version.version, flush=True)
        """
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path), name],
            cwd=PROJECT_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    for worker, (_, errors) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, errors
    per_worker = [[int(v) for v in out.split()] for out, _ in outputs]
    versions = [v for numbers in per_worker for v in numbers]
    assert sorted(versions) == list(range(1, 41))
    # Each round's two versions went one to each worker.
    assert [(v + 1) // 2 for v in per_worker[0]] == list(range(1, 21))
    assert [(v + 1) // 2 for v in per_worker[1]] == list(range(1, 21))
    listed = LocalModelRegistry(path).list_versions()
    assert [v.version for v in listed] == [str(v) for v in range(1, 41)]
    assert {v.dagster_run for v in listed} == {f"{w}-{n}" for w in "ab" for n in range(20)}
    assert sum(v.aliases == ("latest",) for v in listed) == 1


# -- the Vertex backend on the wire --------------------------------------------------------


def test_the_first_upload_creates_the_model_and_later_ones_name_it_as_parent(vertex, fake):
    register(vertex, 1, aliases=(CHAMPION,))
    register(vertex, 2)
    first, second = (call.body for call in fake.calls("upload"))
    assert [call.path for call in fake.calls("upload")] == [
        "/v1/projects/acme-ml/locations/us-central1/models:upload"
    ] * 2
    assert first["modelId"] == MODEL_ID and "parentModel" not in first
    assert second["parentModel"] == f"projects/acme-ml/locations/us-central1/models/{MODEL_ID}"
    assert "modelId" not in second
    model = first["model"]
    assert model["displayName"] == MODEL_ID
    assert model["containerSpec"] == {"imageUri": IMAGE}
    assert model["versionAliases"] == [CHAMPION]
    assert "versionAliases" not in second["model"]  # an empty list is not sent at all
    # Vertex's artifactUri is the artifact's directory; the file is in the description.
    assert model["artifactUri"] == "gs://acme-ml-pipelines/pipeline_root/branch/pr-7/run-1/model"
    described = json.loads(model["versionDescription"])
    assert described["format"] == DESCRIPTION_FORMAT
    assert described["artifact_uri"] == f"{model['artifactUri']}/model.joblib"
    assert described["metrics"] == {"roc_auc": 0.71}
    # Labels are for filtering in the console, sanitised and cut to Vertex's rules.
    assert model["labels"] == {
        "model": "flight-delay",
        "cutoff": "2013-10-01",
        "data_fingerprint": f"{1:064x}"[:63],
        "template_version": TEMPLATE.replace(":", "-")[:63],
        "dagster_run": "run-1",
    }
    # Whether the model exists is asked before each upload.
    assert [c.path.rsplit("/", 1)[-1] for c in fake.calls("get")][:1] == [MODEL_ID]
    assert fake.version_ids(MODEL_ID) == ["1", "2"]


def test_the_deployments_labels_are_on_every_version(fake):
    registry = make_vertex(fake, labels={"app": "ml-platform", "Pull Request": "7"})
    version = register(registry, 1)
    assert version.labels["app"] == "ml-platform"
    assert version.labels["pull_request"] == "7"
    assert fake.calls("upload")[0].body["model"]["labels"]["pull_request"] == "7"


def test_moving_an_alias_is_one_merge_on_the_version(vertex, fake):
    register(vertex, 1, aliases=(CHAMPION,))
    register(vertex, 2)
    vertex.move_alias(CHAMPION, "2")
    (merge,) = fake.calls("merge")
    assert merge.method == "POST"
    assert merge.path == (
        f"/v1/projects/acme-ml/locations/us-central1/models/{MODEL_ID}@2:mergeVersionAliases"
    )
    assert merge.body == {"versionAliases": [CHAMPION]}
    assert fake.aliases(MODEL_ID) == {CHAMPION: "2", "default": "1"}


def test_vertexs_default_alias_is_neither_shown_nor_settable(vertex, fake):
    register(vertex, 1)
    assert fake.aliases(MODEL_ID) == {"default": "1"}
    assert vertex.get("1").aliases == ()
    with pytest.raises(ModelRegistryError, match="'default' is Vertex AI's own"):
        vertex.move_alias("default", "1")
    with pytest.raises(ModelRegistryError, match="'default' is Vertex AI's own"):
        register(vertex, 2, aliases=("default",))
    assert not fake.calls("merge") and len(fake.calls("upload")) == 1


def test_a_503_is_retried_once_and_the_version_registered_once(vertex, fake):
    fake.fail_next(503, 1, kind="upload")
    version = register(vertex, 1)
    assert version.version == "1"
    assert [c.status for c in fake.calls("upload")] == [503, 200]
    assert fake.version_ids(MODEL_ID) == ["1"]
    fake.fail_next(503, 1, kind="get")
    assert vertex.get("1") == version
    assert [c.status for c in fake.calls("get")][-2:] == [503, 200]


def test_a_403_is_one_line_naming_the_model_and_endpoint_and_is_not_retried(vertex, fake):
    fake.fail_next(403, 1, message="Permission 'aiplatform.models.upload' denied on resource")
    with pytest.raises(ModelRegistryError) as failure:
        register(vertex, 1)
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(
        f"Vertex AI could not look up the model (model {MODEL_ID} in "
        f"projects/acme-ml/locations/us-central1, endpoint {fake.url}): 403 GET"
    )
    assert "aiplatform.models.upload' denied" in message
    assert [c.status for c in fake.requests] == [403]

    fake.fail_next(403, 1, kind="upload", message="Permission denied")
    expected = f"could not register a version \\(model {MODEL_ID} in "
    with pytest.raises(ModelRegistryError, match=expected):
        register(vertex, 1)
    assert [c.status for c in fake.calls("upload")] == [403]


def test_transient_errors_past_the_retry_deadline_give_up_clearly(fake):
    registry = make_vertex(fake, retry_deadline=0.3)
    fake.fail_next(500, 1000, kind="list")
    with pytest.raises(ModelRegistryError) as failure:
        registry.list_versions()
    message = str(failure.value)
    assert f"could not list the versions (model {MODEL_ID} in " in message
    assert "gave up retrying transient errors" in message and "injected by the fake" in message
    assert len(fake.calls("list")) > 1


def test_an_upload_whose_operation_must_be_polled_is_waited_for():
    with FakeVertexModels(operation_polls=3) as fake:
        registry = make_vertex(fake)
        version = register(registry, 1, aliases=(CHAMPION,))
        assert (version.version, version.aliases) == ("1", (CHAMPION,))
        assert len(fake.calls("upload")) == 1
        polls = fake.calls("operation")
        assert len(polls) == 3 and all(p.status == 200 for p in polls)
        # The client polls through /ui/ (aiplatform's first GetOperation rule); the
        # reference documents /v1/: the fake serves both.
        operation = f"projects/123456789012/locations/us-central1/models/{MODEL_ID}/operations/4001"
        assert [p.path for p in polls] == [f"/ui/{operation}"] * 3
        # The version is read back only after the operation said it exists.
        first_read = next(i for i, r in enumerate(fake.requests) if r.path.endswith("@1"))
        assert fake.requests.index(polls[-1]) < first_read
        # A poll answered 503 is retried like any read.
        fake.fail_next(503, 1, kind="operation")
        assert register(registry, 2).version == "2"
        assert [p.status for p in fake.calls("operation")][3:] == [503, 200, 200, 200]
        status, answer = fake.handle("GET", f"/v1/{operation}", b"")
        assert status == 200 and answer["done"] and answer["response"]["modelVersionId"] == "1"


def test_an_upload_whose_operation_fails_is_an_error(vertex, fake):
    fake.fail_next_operation("INVALID_ARGUMENT", "artifact directory is empty")
    with pytest.raises(ModelRegistryError) as failure:
        register(vertex, 1)
    assert "artifact directory is empty" in str(failure.value)
    assert f"model {MODEL_ID}" in str(failure.value)
    assert fake.version_ids(MODEL_ID) == []


def test_an_upload_that_does_not_finish_in_time_says_the_version_may_still_appear():
    with FakeVertexModels(operation_polls=10_000) as fake:
        registry = make_vertex(fake, upload_timeout=0.3)
        with pytest.raises(ModelRegistryError, match="may still appear"):
            register(registry, 1)


def test_a_model_created_by_another_process_meanwhile_gets_a_new_version(vertex, fake):
    register(make_vertex(fake), 1)
    # This registry looks while the model does not exist yet, then uploads as its creator.
    fake.fail_next(404, 1, kind="get", message="Model not found")
    version = register(vertex, 2, aliases=(CHAMPION,))
    assert version.version == "2" and version.aliases == (CHAMPION,)
    statuses = [(c.status, "modelId" in c.body) for c in fake.calls("upload")]
    assert statuses == [(200, True), (409, True), (200, False)]


def test_listing_follows_every_page(fake):
    registry = make_vertex(fake, page_size=2)
    for n in range(1, 6):
        register(registry, n)
    assert [v.version for v in registry.list_versions()] == ["1", "2", "3", "4", "5"]
    pages = fake.calls("list")
    assert [p.query.get("pageSize") for p in pages] == ["2", "2", "2"]
    assert "pageToken" not in pages[0].query
    assert all(p.query.get("pageToken") for p in pages[1:])
    assert fake.unsupported == []


def test_the_fake_refuses_what_it_does_not_implement(fake):
    status, answer = fake.handle(
        "GET",
        f"/v1/projects/acme-ml/locations/us-central1/models/{MODEL_ID}:listVersions?filter=x",
        b"",
    )
    assert status == 400 and "does not implement" in answer["error"]["message"]
    body = {"modelId": MODEL_ID, "model": {"displayName": "x", "metadata": {"a": 1}}}
    upload = "/v1/projects/acme-ml/locations/us-central1/models:upload"
    status, answer = fake.handle("POST", upload, json.dumps(body).encode())
    assert status == 400 and "metadata" in answer["error"]["message"]
    assert len(fake.unsupported) == 2


def test_an_artifact_outside_cloud_storage_is_refused_before_calling_vertex(vertex, fake):
    for uri in ("/data/model.joblib", "gs://bucket-only", "gs://bucket/folder/"):
        with pytest.raises(ModelRegistryError, match="gs://BUCKET/PATH/FILE"):
            vertex.register(
                uri,
                metrics={},
                cutoff="2013-10-01",
                data_fingerprint="",
                template_version="",
                dagster_run="",
            )
    assert fake.requests == []


def test_the_model_id_follows_the_deployment(fake):
    common = {
        "ML_PLATFORM_GCP_PROJECT": "acme-ml",
        "ML_PLATFORM_GCS_BUCKET": "acme-ml-pipelines",
        "ML_PLATFORM_VERTEX_API_ENDPOINT": fake.url,
        "ML_PLATFORM_COMPONENT_IMAGE": IMAGE,
    }
    prod = Settings.from_env({**common, "DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod"})
    branch = Settings.from_env(
        {
            **common,
            "DAGSTER_CLOUD_DEPLOYMENT_NAME": "pr-7",
            "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT": "1",
            "DAGSTER_CLOUD_PULL_REQUEST_ID": "7",
        }
    )
    assert model_id_for(prod) == "flight-delay"
    assert model_id_for(branch) == "flight-delay-pr-7"
    registry = VertexModelRegistry.from_settings(branch, credentials=AnonymousCredentials())
    assert (registry.project, registry.region) == ("acme-ml", "us-central1")
    assert registry.model_name == "projects/acme-ml/locations/us-central1/models/flight-delay-pr-7"
    assert registry.api_endpoint == fake.url
    assert registry.serving_image == branch.component_image
    register(registry, 1)
    labels = fake.calls("upload")[0].body["model"]["labels"]
    assert labels["deployment"] == "branch" and labels["pull_request"] == "7"
    assert VertexModelRegistry.from_settings(prod).model_id == "flight-delay"


@pytest.mark.parametrize("model_id", ["7-flight", "-x", "Flight", "a" * 64, "flight.delay", ""])
def test_a_model_id_vertex_would_refuse_is_refused(model_id):
    with pytest.raises(ValueError, match="63 characters"):
        VertexModelRegistry(
            project="acme-ml", region="us-central1", model_id=model_id, serving_image=IMAGE
        )


def test_importing_the_vertex_registry_loads_no_google_library():
    # Compared with what the interpreter loads at startup (a .pth file of the Google
    # packages creates the bare ``google.cloud`` namespace before any import).
    code = (
        "import json, sys; before = set(sys.modules); "
        "import ml_platform.resources.model_registry.vertex; "
        "print(json.dumps(sorted(m for m in set(sys.modules) - before "
        "if m.startswith(('google', 'grpc', 'proto')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
