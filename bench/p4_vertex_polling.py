"""P4: Vertex AI API calls made while waiting one simulated hour for a pipeline job.

Ours (``VertexPipelineRunner.run``: poll with backoff) against the SDK's
``aiplatform.PipelineJob.wait()`` (a get every 5 s). Both talk through the real GAPIC REST
client to the local fake Vertex of the tests (tests/gcp/fake_vertex.py) on a fake clock,
so the hour takes a moment and every call is counted at the server. The SDK's own
``time.sleep``/``time.time`` are pointed at the fake clock for its run; nothing else of it
is changed. The job is PENDING, RUNNING after a minute, SUCCEEDED after an hour. The goal
is <= 60 calls for ours.

    uv run python bench/p4_vertex_polling.py
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import types
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))  # for tests.gcp.fake_vertex

from google.auth.credentials import AnonymousCredentials  # noqa: E402

from ml_platform.pipelines import TRAINING_PIPELINE  # noqa: E402
from ml_platform.pipelines.compile import compile_pipeline  # noqa: E402
from ml_platform.resources.pipeline_runs import JobRequest  # noqa: E402
from ml_platform.resources.pipeline_runs.vertex import VERTEX_POLL, VertexPipelineRunner  # noqa: E402
from ml_platform.resources.templates import (  # noqa: E402
    TemplateRegistry,
    TemplateVersion,
    template_version_of,
)
from tests.gcp.fake_vertex import FakeClock, FakeVertex  # noqa: E402

HOUR = 3600.0
GOAL = 60
PLAN = ((0, "PENDING"), (60, "RUNNING"), (HOUR, "SUCCEEDED"))
REPOSITORY_URL = "https://us-central1-kfp.pkg.dev/acme-ml/pipeline-templates"


class OneTemplate(TemplateRegistry):
    """The compiled training template under its Artifact Registry version URL."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        version = template_version_of(content)
        self.version = TemplateVersion(
            TRAINING_PIPELINE, version, f"{REPOSITORY_URL}/{TRAINING_PIPELINE}/{version}"
        )

    def upload(self, package, template, tags):
        raise NotImplementedError

    def resolve(self, package, tag):
        return self.version

    def list_versions(self, package):
        return [self.version]

    def fetch(self, version):
        return self.content


def request(registry: OneTemplate, job_id: str) -> JobRequest:
    return JobRequest(
        job_id=job_id,
        template=registry.version,
        parameters={
            "warehouse_uri": "bigquery://acme-ml",
            "features_dataset": "flights_features",
            "cutoff_date": "2013-10-01",
        },
        labels={"deployment": "prod", "asset": "flight_delay_model"},
    )


def runner_for(vertex: FakeVertex, registry: OneTemplate) -> VertexPipelineRunner:
    return VertexPipelineRunner(
        project=vertex.project,
        region=vertex.location,
        pipeline_root="gs://acme-ml-pipelines/pipeline_root/prod",
        registry=registry,
        api_endpoint=vertex.url,
        credentials=AnonymousCredentials(),
    )


def ours(registry: OneTemplate) -> tuple[int, int, float]:
    """Get calls while waiting, all calls, and how late the end was seen."""
    clock = FakeClock()
    with FakeVertex(clock=clock.time) as vertex:
        vertex.plan("ours", *PLAN)
        started = clock.time()
        runner_for(vertex, registry).run(
            request(registry, "ours"), sleep=clock.sleep, clock=clock.monotonic
        )
        lookups = 1  # the get before creating, which finds nothing
        return (
            len(vertex.calls("get")) - lookups,
            len(vertex.requests),
            clock.time() - started - HOUR,
        )


def sdk(registry: OneTemplate) -> tuple[int, float, bool]:
    """Get calls made by the SDK's PipelineJob.wait(), the import time it cost, and whether
    its wait() returns normally for a job that was CANCELLED."""
    imported = time.perf_counter()
    from google.cloud import aiplatform
    from google.cloud.aiplatform import pipeline_jobs

    imported = time.perf_counter() - imported
    clock = FakeClock()
    with FakeVertex(clock=clock.time) as vertex:
        vertex.plan("sdk", *PLAN)
        vertex.plan("sdk-cancelled", (0, "RUNNING"), (600, "CANCELLED"))
        for job_id in ("sdk", "sdk-cancelled"):  # created as ours are
            runner_for(vertex, registry).submit(request(registry, job_id))
        aiplatform.init(
            project=vertex.project,
            location=vertex.location,
            credentials=AnonymousCredentials(),
            api_endpoint=vertex.url,
            api_transport="rest",
        )
        real_time = pipeline_jobs.time
        pipeline_jobs.time = types.SimpleNamespace(sleep=clock.sleep, time=clock.time)
        logging.disable(logging.INFO)  # wait() logs the state at every poll
        try:
            job = aiplatform.PipelineJob.get(f"{vertex.parent}/pipelineJobs/sdk")
            before = len(vertex.calls("get"))  # not counting PipelineJob.get() itself
            job.wait()
            gets = len(vertex.calls("get")) - before
            cancelled = aiplatform.PipelineJob.get(f"{vertex.parent}/pipelineJobs/sdk-cancelled")
            try:
                cancelled.wait()
                cancelled_is_success = True
            except RuntimeError:
                cancelled_is_success = False
        finally:
            pipeline_jobs.time = real_time
            logging.disable(logging.NOTSET)
        return gets, imported, cancelled_is_success


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        path = compile_pipeline(
            TRAINING_PIPELINE, Path(scratch) / "training.yaml", image="ml-platform:bench"
        )
        registry = OneTemplate(path.read_bytes())
    our_gets, our_calls, lag = ours(registry)
    sdk_gets, sdk_import, sdk_cancelled_is_success = sdk(registry)
    policy = VERTEX_POLL
    print("P4 Vertex AI API calls while waiting one simulated hour for a pipeline job")
    print(
        f"  ours: VertexPipelineRunner.run (poll {policy.initial_interval:g} s, "
        f"x{policy.backoff:g}, up to {policy.max_interval:g} s)"
    )
    print(
        f"    {our_gets:4d} get calls while waiting ({our_calls} calls in all, with the "
        f"look-up and the create); the end seen {lag:.0f} s late"
    )
    print("  SDK:  aiplatform.PipelineJob.wait() (a get every 5 s, measured the same way)")
    print(
        f"    {sdk_gets:4d} get calls while waiting "
        f"(importing google.cloud.aiplatform took {sdk_import:.1f} s)"
    )
    answer = "returns normally" if sdk_cancelled_is_success else "raises"
    print(f"    and its wait() {answer} for a job that was CANCELLED")
    verdict = "meets" if our_gets <= GOAL else "misses"
    print(
        f"  ratio: {sdk_gets / our_gets:.1f}x fewer calls than the SDK; "
        f"ours {verdict} the goal <= {GOAL}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
