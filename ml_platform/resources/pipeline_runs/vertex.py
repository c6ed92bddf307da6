"""The Vertex AI Pipelines backend: the GAPIC ``PipelineServiceClient``, nothing higher.

Not ``aiplatform.PipelineJob``: its ``submit`` checks (and may create) the bucket and calls
Resource Manager with long, swallowed retries, and its ``wait`` polls every 5 s forever and
takes CANCELLED (and PAUSED) for success. ``PipelineRunner`` holds the waiting, reattaching
and cancelling; this module only maps the four primitives onto the API:

- ``submit``: ``create_pipeline_job`` with our job id as ``pipelineJobId``, the template's
  compiled spec *and* its immutable ``sha256:`` version URL as ``template_uri``;
  ALREADY_EXISTS becomes ``JobAlreadyExistsError`` so the caller reattaches.
- ``get``: ``get_pipeline_job``; NOT_FOUND is None. The pipeline's declared outputs are read
  from the job's task details in the shape the local backend records. A ``PipelineState``
  this code does not know is a ``PipelineJobError`` naming it (in a listing too).
- ``cancel``: ``cancel_pipeline_job``; a job that already ended is left alone.
- ``list_jobs``: ``list_pipeline_jobs`` with a server-side filter, ``order_by`` and a read
  mask, page by page as the caller iterates.

Every call retries transient errors (``retries.RETRYABLE_STATUS``: 429, 500, 502, 503, 504
and their gRPC equivalents; a dropped or timed-out connection) with exponential backoff up
to a bounded deadline, and has its own request timeout (the GAPIC defaults are no retry and
no timeout). Permanent errors raise ``VertexApiError`` naming the job.

Google libraries are imported inside the functions that use them: this module is reached
when the code location is imported, and ``google.cloud.aiplatform_v1`` alone takes seconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ml_platform.resources.google_api import api_errors, gapic_client
from ml_platform.resources.pipeline_runs import (
    JobAlreadyExistsError,
    JobRequest,
    JobState,
    PipelineJob,
    PipelineJobError,
    PipelineRunner,
    PollPolicy,
)
from ml_platform.resources.retries import Backoff, is_transient
from ml_platform.resources.templates import TemplateRegistry, TemplateVersion
from ml_platform.settings import sanitize_label_key, sanitize_label_value

if TYPE_CHECKING:
    from ml_platform.settings import Settings

# Vertex jobs take minutes to hours and every poll is an API call against a per-minute
# quota. The first look comes 5 s after submitting (a job Vertex rejects at start, e.g. for
# a bad service account, fails fast), then the interval grows by 1.5x to 75 s, reached after
# about 2.7 minutes. Waiting one hour makes 53 get calls (the SDK's wait() makes 721:
# bench/p4_vertex_polling.py), and a job is seen to have ended at most 75 s after it did.
VERTEX_POLL = PollPolicy(initial_interval=5.0, max_interval=75.0, backoff=1.5, deadline=24 * 3600)

# What list_jobs reads: enough for the completion sensor, never the pipeline spec (tens of
# kB per job) nor the task details (which the list view does not return anyway).
LIST_READ_MASK = (
    "name",
    "display_name",
    "state",
    "labels",
    "create_time",
    "start_time",
    "end_time",
    "update_time",
    "error",
    "template_uri",
    "template_metadata.version",
    "pipeline_spec.pipeline_info",
    "runtime_config.parameter_values",
)
CANCEL_RETRY_DEADLINE = 30.0
ORDER_BY = "end_time"  # documented order_by fields: create_time, update_time, end_time, start_time

# https://cloud.google.com/resource-manager/docs/labels-overview#requirements
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_MAX_LABELS = 64
# Vertex sets this one itself and overwrites whatever a caller sends.
_RESERVED_LABELS = frozenset({"vertex-ai-pipelines-run-billing-id"})
_DISPLAY_NAME_MAX = 128
_UNSPECIFIED = "PIPELINE_STATE_UNSPECIFIED"


class VertexApiError(PipelineJobError):
    """The Vertex AI API refused a call, or kept failing past the retry deadline."""


def vertex_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels as Vertex accepts them: valid ones unchanged, others sanitised, collisions refused.

    ``Settings`` already sanitises the labels it makes; this is the last line for labels
    from anywhere else, because Vertex rejects the whole job for one bad label.
    """
    result: dict[str, str] = {}
    for key, value in labels.items():
        clean_key = key if _LABEL_KEY.fullmatch(key) else sanitize_label_key(key)
        clean_value = value if _LABEL_VALUE.fullmatch(value) else sanitize_label_value(value)
        if clean_key in _RESERVED_LABELS:
            continue
        if clean_key in result and result[clean_key] != clean_value:
            raise ValueError(
                f"labels {key!r} and another key both become {clean_key!r} under Vertex's "
                "label rules; rename one"
            )
        result[clean_key] = clean_value
    if len(result) > _MAX_LABELS:
        raise ValueError(f"{len(result)} labels; Vertex allows at most {_MAX_LABELS}")
    return result


def list_filter(
    *,
    labels: Mapping[str, str] | None,
    states: Iterable[JobState] | None,
    ended_after: datetime | None,
) -> str:
    """The ``list_pipeline_jobs`` filter (AIP-160) for the completion sensor's questions."""
    terms = []
    for key, value in (labels or {}).items():
        # Label keys and values cannot hold quotes or spaces, so no escaping is needed; one
        # that breaks the rules matches no job, which is a caller's bug worth raising.
        if not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
            raise ValueError(f"label {key}={value!r} breaks Vertex's label rules; no job has it")
        terms.append(f'labels.{key}="{value}"')
    if states is not None:
        names = sorted({JobState(s).value for s in states})
        alternatives = " OR ".join(f'state="{name}"' for name in names)
        # AIP-160 binds OR tighter than AND, but the parentheses keep it unambiguous.
        terms.append(f"({alternatives})" if len(names) > 1 else alternatives)
    if ended_after is not None:
        when = ended_after.astimezone(UTC).isoformat(timespec="microseconds")
        terms.append(f'end_time>"{when.replace("+00:00", "Z")}"')
    return " AND ".join(terms)


def set_caching(spec: dict[str, Any], enabled: bool) -> None:
    """Job-level caching, as the SDK's ``enable_caching`` applies it: to every task of every DAG.

    Only called to turn caching off. When it is on, each task keeps what the pipeline
    author compiled (ours disable it for tasks that read or write the warehouse), whereas
    the SDK's ``enable_caching=True`` would switch it on for those too.
    """
    for component in [spec.get("root", {}), *spec.get("components", {}).values()]:
        for task in component.get("dag", {}).get("tasks", {}).values():
            task["cachingOptions"] = {"enableCache": enabled}


def check_parameters(spec: Mapping[str, Any], parameters: Mapping[str, Any], job_id: str) -> None:
    """Refuse unknown or missing parameters before Vertex does, with the names that differ."""
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(parameters) - set(declared))
    missing = sorted(
        name
        for name, definition in declared.items()
        if name not in parameters
        and not definition.get("isOptional")
        and "defaultValue" not in definition
    )
    if unknown or missing:
        pipeline = spec.get("pipelineInfo", {}).get("name", "?")
        problems = []
        if unknown:
            problems.append(f"unknown parameters {', '.join(unknown)}")
        if missing:
            problems.append(f"missing parameters {', '.join(missing)}")
        raise PipelineJobError(
            f"pipeline job {job_id} ({pipeline}): {'; '.join(problems)} "
            f"(the template declares: {', '.join(sorted(declared)) or 'none'})"
        )


# -- reading a job -----------------------------------------------------------------------


def _timestamp(value: str | None) -> datetime | None:
    # RFC 3339 with up to nine fractional digits; fromisoformat keeps microseconds.
    return datetime.fromisoformat(value) if value else None


def _coerce(value: Any, parameter_type: str | None) -> Any:
    """A parameter value as its declared type: JSON (protobuf Struct) has only doubles."""
    if value is None:
        return None
    if parameter_type == "NUMBER_INTEGER":
        return int(float(value))
    if parameter_type == "NUMBER_DOUBLE":
        return float(value)
    if parameter_type == "STRING":
        return value if isinstance(value, str) else str(value)
    if parameter_type == "BOOLEAN" and isinstance(value, str):
        return value.lower() == "true"
    return value


def _first_artifact(task: Mapping[str, Any] | None, key: str) -> Mapping[str, Any] | None:
    if task is None:
        return None
    artifacts = task.get("outputs", {}).get(key, {}).get("artifacts", [])
    return artifacts[0] if artifacts else None


def _output_parameter(task: Mapping[str, Any] | None, key: str) -> tuple[bool, Any]:
    # Vertex keeps a task's output parameters in its execution's metadata as "output:KEY"
    # (task outputs are artifact lists only); the SDK reads them the same way.
    if task is None:
        return False, None
    metadata = task.get("execution", {}).get("metadata", {})
    name = f"output:{key}"
    return (True, metadata[name]) if name in metadata else (False, None)


def resolve_outputs(
    job_id: str, spec: Mapping[str, Any], task_details: list[Mapping[str, Any]]
) -> dict[str, Any]:
    """The pipeline's declared outputs by name, in the local backend's shape.

    Artifacts become ``{"uri", "type", "metadata"}`` (a Metrics artifact's metadata holds
    its logged metrics), parameters their value as declared. Vertex records the run itself
    as a task named after the job, carrying the root DAG's outputs; where that record lacks
    one (or the run task is not listed), the output is read from the root DAG's task that
    produced it, found through the spec's ``root.dag.outputs`` selectors.
    """
    root_spec = spec.get("root", {})
    declared = root_spec.get("outputDefinitions", {})
    selectors = root_spec.get("dag", {}).get("outputs", {})
    run_task = next(
        (t for t in task_details if t.get("taskName") == job_id and not t.get("parentTaskId")),
        None,
    )
    # A task is in the root DAG unless its parent is another listed task (the scope of a
    # sub-DAG or loop it is nested in): its parentTaskId may be the run task's id, empty
    # (PipelineTaskDetail: "Empty if the task is at the root level"), or the id of a run
    # task the details lack.
    scopes = {t["taskId"] for t in task_details if t is not run_task and t.get("taskId")}
    producers: dict[str, Mapping[str, Any]] = {}
    for task in task_details:
        if task is run_task or task.get("parentTaskId") in scopes:
            continue
        # A task name is unique within its DAG; prefer the attempt that succeeded.
        name = task.get("taskName", "")
        if name not in producers or task.get("state") == "SUCCEEDED":
            producers[name] = task

    outputs: dict[str, Any] = {}
    for name, definition in declared.get("artifacts", {}).items():
        artifact = _first_artifact(run_task, name)
        for selector in selectors.get("artifacts", {}).get(name, {}).get("artifactSelectors", []):
            if artifact is not None:
                break
            producer = producers.get(selector.get("producerSubtask", ""))
            artifact = _first_artifact(producer, selector.get("outputArtifactKey", ""))
        if artifact is not None:
            outputs[name] = {
                "uri": artifact.get("uri", ""),
                "type": artifact.get("schemaTitle")
                or definition.get("artifactType", {}).get("schemaTitle", ""),
                "metadata": dict(artifact.get("metadata", {})),
            }
    for name, definition in declared.get("parameters", {}).items():
        found, value = _output_parameter(run_task, name)
        if not found:
            source = selectors.get("parameters", {}).get(name, {}).get("valueFromParameter", {})
            producer = producers.get(source.get("producerSubtask", ""))
            found, value = _output_parameter(producer, source.get("outputParameterKey", ""))
        if found:
            outputs[name] = _coerce(value, definition.get("parameterType"))
    return outputs


def _failed_task_errors(task_details: list[Mapping[str, Any]]) -> list[str]:
    return [
        f"{t.get('taskName', '?')}: {t['error']['message']}"
        for t in task_details
        if t.get("state") == "FAILED" and t.get("error", {}).get("message")
    ]


class VertexPipelineRunner(PipelineRunner):
    """Runs compiled templates on Vertex AI Pipelines, one ``PipelineJob`` per request."""

    def __init__(
        self,
        *,
        project: str,
        region: str,
        pipeline_root: str,
        registry: TemplateRegistry,
        service_account: str | None = None,
        network: str | None = None,
        enable_caching: bool = True,
        api_endpoint: str | None = None,
        credentials: Any = None,
        transport: str = "rest",
        poll: PollPolicy = VERTEX_POLL,
        request_timeout: float = 60.0,
        retry_initial: float = 1.0,
        retry_maximum: float = 30.0,
        retry_deadline: float = 180.0,
    ) -> None:
        if not pipeline_root.startswith("gs://"):
            raise ValueError(f"Vertex needs a gs:// pipeline root, got {pipeline_root!r}")
        self.project = project
        self.region = region
        self.pipeline_root = pipeline_root
        self.registry = registry
        self.service_account = service_account
        self.network = network
        self.enable_caching = enable_caching
        self.api_endpoint = api_endpoint or f"{region}-aiplatform.googleapis.com"
        self.credentials = credentials
        # REST by default: it is the transport the wire tests exercise, and a handful of
        # calls a minute gains nothing from gRPC's long-lived channels.
        self.transport = transport
        self.poll = poll
        self.request_timeout = request_timeout
        self.retry_initial = retry_initial
        self.retry_maximum = retry_maximum
        self.retry_deadline = retry_deadline

    @classmethod
    def from_settings(
        cls, settings: Settings, registry: TemplateRegistry, **overrides: Any
    ) -> VertexPipelineRunner:
        if not settings.gcp_project:
            raise ValueError("the Vertex runner needs ML_PLATFORM_GCP_PROJECT")
        arguments: dict[str, Any] = {
            "project": settings.gcp_project,
            "region": settings.gcp_region,
            "pipeline_root": settings.pipeline_root,
            "registry": registry,
            "service_account": settings.vertex_service_account,
            "network": settings.vertex_network,
            "enable_caching": settings.vertex_caching,
            "api_endpoint": settings.vertex_api_endpoint,
        }
        return cls(**{**arguments, **overrides})

    # -- names and links -----------------------------------------------------------------

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    def job_name(self, job_id: str) -> str:
        return f"{self.parent}/pipelineJobs/{job_id}"

    def links(self, job_id: str) -> dict[str, str]:
        console = (
            f"https://console.cloud.google.com/vertex-ai/locations/{self.region}"
            f"/pipelines/runs/{job_id}?project={self.project}"
        )
        query = (
            'resource.type="aiplatform.googleapis.com/PipelineJob"\n'
            f'resource.labels.pipeline_job_id="{job_id}"'
        )
        logs = (
            f"https://console.cloud.google.com/logs/query;query={quote(query, safe='')}"
            f"?project={self.project}"
        )
        return {"console": console, "logs": logs}

    # -- the client and its error handling -------------------------------------------------

    @cached_property
    def _client(self) -> Any:
        from google.cloud.aiplatform_v1 import PipelineServiceClient

        return gapic_client(
            PipelineServiceClient,
            endpoint=self.api_endpoint,
            credentials=self.credentials,
            transport=self.transport,
        )

    @cached_property
    def _retry(self) -> Any:
        # Retrying a create is safe: the job id makes it idempotent. If the first attempt
        # did create the job, the retry gets ALREADY_EXISTS and the caller reattaches.
        backoff = Backoff(
            initial=self.retry_initial, maximum=self.retry_maximum, deadline=self.retry_deadline
        )
        return backoff.retry(is_transient)

    def _call(self, method: Callable[..., Any], *, retry: Any = None, **arguments: Any) -> Any:
        return method(**arguments, retry=retry or self._retry, timeout=self.request_timeout)

    def _error(self, action: str, job: str, error: BaseException) -> VertexApiError:
        from google.api_core import exceptions

        where = f"in {self.parent} (endpoint {self.api_endpoint})"
        if isinstance(error, exceptions.RetryError):
            return VertexApiError(
                f"Vertex AI could not {action} {job} {where}: gave up retrying transient "
                f"errors ({error.message}); last error: {error.cause}"
            )
        return VertexApiError(f"Vertex AI could not {action} {job} {where}: {error}")

    @staticmethod
    def _api_errors() -> tuple[type[BaseException], ...]:
        return api_errors()

    # -- the four primitives -------------------------------------------------------------

    def pipeline_spec(self, request: JobRequest) -> dict[str, Any]:
        """The compiled spec of the request's template version, with job-level caching."""
        import yaml

        document = yaml.safe_load(self.registry.fetch(request.template))
        if not isinstance(document, dict):
            raise PipelineJobError(f"template {request.template.uri} is not a pipeline spec")
        # A template may be a bare PipelineSpec (what kfp compiles) or a whole PipelineJob.
        spec = document.get("pipelineSpec", document)
        if "root" not in spec or "pipelineInfo" not in spec:
            raise PipelineJobError(
                f"template {request.template.uri} has no root/pipelineInfo: not a compiled "
                "KFP pipeline"
            )
        if not self.enable_caching:
            set_caching(spec, False)
        return spec

    @staticmethod
    def template_uri(template: TemplateVersion) -> str:
        """The version's own URL: Vertex's service agent may not be allowed to read tags."""
        if not (
            template.uri.startswith("https://") and template.uri.endswith(f"/{template.version}")
        ):
            raise PipelineJobError(
                f"template {template.package} {template.version} has uri {template.uri!r}; "
                "Vertex needs its Artifact Registry version URL "
                f"(https://REGION-kfp.pkg.dev/PROJECT/REPOSITORY/{template.package}/"
                f"{template.version}), never a tag or a local file"
            )
        return template.uri

    def submit(self, request: JobRequest) -> PipelineJob:
        from google.api_core import exceptions
        from google.cloud.aiplatform_v1 import types

        template_uri = self.template_uri(request.template)
        spec = self.pipeline_spec(request)
        check_parameters(spec, request.parameters, request.job_id)
        job = types.PipelineJob(
            display_name=(request.display_name or request.job_id)[:_DISPLAY_NAME_MAX],
            labels=vertex_labels(request.labels),
            pipeline_spec=spec,
            template_uri=template_uri,
            runtime_config=types.PipelineJob.RuntimeConfig(
                gcs_output_directory=self.pipeline_root,
                parameter_values=dict(request.parameters),
            ),
            service_account=self.service_account or "",
            network=self.network or "",
        )
        try:
            created = self._call(
                self._client.create_pipeline_job,
                parent=self.parent,
                pipeline_job=job,
                pipeline_job_id=request.job_id,
            )
        except exceptions.Conflict as error:
            # REST maps every 409 to Conflict; only ABORTED is not "the id is taken".
            if isinstance(error, exceptions.Aborted) or _status(error) == "ABORTED":
                raise self._error("create", f"pipeline job {request.job_id}", error) from error
            raise JobAlreadyExistsError(
                f"pipeline job {request.job_id} already exists in {self.parent}"
            ) from error
        except self._api_errors() as error:
            raise self._error("create", f"pipeline job {request.job_id}", error) from error
        return self.to_pipeline_job(created)

    def get(self, job_id: str) -> PipelineJob | None:
        from google.api_core import exceptions

        try:
            found = self._call(self._client.get_pipeline_job, name=self.job_name(job_id))
        except exceptions.NotFound:
            return None
        except self._api_errors() as error:
            raise self._error("get", f"pipeline job {job_id}", error) from error
        return self.to_pipeline_job(found)

    def cancel(self, job_id: str) -> None:
        from google.api_core import exceptions

        try:
            # Cancelling mostly happens on the way out of a terminated run, which has a
            # grace period of its own: keep retrying for less time than other calls do.
            self._call(
                self._client.cancel_pipeline_job,
                name=self.job_name(job_id),
                retry=self._retry.with_timeout(min(self.retry_deadline, CANCEL_RETRY_DEADLINE)),
            )
        except exceptions.NotFound:
            return  # nothing to cancel
        except exceptions.BadRequest as error:
            # Vertex answers FAILED_PRECONDITION (400) for a job that is no longer
            # cancellable; one that ended, or is already being cancelled, is fine.
            job = self.get(job_id)
            if job is not None and (job.state.is_terminal or job.state is JobState.CANCELLING):
                return
            raise self._error("cancel", f"pipeline job {job_id}", error) from error
        except self._api_errors() as error:
            raise self._error("cancel", f"pipeline job {job_id}", error) from error

    def list_jobs(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        states: Iterable[JobState] | None = None,
        ended_after: datetime | None = None,
        page_size: int = 100,
    ) -> Iterator[PipelineJob]:
        """Jobs matching every filter, oldest end first, fetched a page at a time as iterated.

        They come from Vertex's list view (``LIST_READ_MASK``): no task details, so no
        ``outputs``; ``get`` a job for those. Jobs without an end time (still running) have
        no defined place in the order, so ask for ended states or ``ended_after``. A job in
        a state this code does not know stops the listing with an error naming it (a filter
        on known states, as the completion sensor's, never returns one).
        """
        from google.cloud.aiplatform_v1 import types
        from google.protobuf import field_mask_pb2

        if states is not None:
            states = list(states)
            if not states:
                return  # no state asked for: no job can match
        request = types.ListPipelineJobsRequest(
            parent=self.parent,
            filter=list_filter(labels=labels, states=states, ended_after=ended_after),
            order_by=ORDER_BY,
            page_size=page_size,
            read_mask=field_mask_pb2.FieldMask(paths=list(LIST_READ_MASK)),
        )
        what = f"pipeline jobs matching {request.filter or 'no filter'!r}"
        try:
            # The pager fetches the next page only when the caller gets that far, with the
            # same retry and timeout as the first.
            pager = self._call(self._client.list_pipeline_jobs, request=request)
            for job in pager:
                yield self.to_pipeline_job(job)
        except self._api_errors() as error:
            raise self._error("list", what, error) from error

    # -- the API's job as ours -----------------------------------------------------------

    def to_pipeline_job(self, job: Any) -> PipelineJob:
        from google.protobuf import json_format

        # The JSON form (camelCase, enum names, RFC 3339 times) is the documented REST
        # shape, whichever transport brought it; Struct fields arrive as plain values.
        data = json_format.MessageToDict(type(job).pb(job))
        return self.from_json(data)

    def from_json(self, data: Mapping[str, Any]) -> PipelineJob:
        job_id = data["name"].rsplit("/", 1)[-1]
        spec = data.get("pipelineSpec", {})
        raw_state = data.get("state", _UNSPECIFIED)  # JSON omits the default value
        try:
            # UNSPECIFIED: a job Vertex has only just created, not started yet.
            state = JobState.QUEUED if raw_state == _UNSPECIFIED else JobState(raw_state)
        except ValueError:
            # A state newer than this code (the client library passes it on as its number):
            # waiting on it as QUEUED would last until the deadline, so say what it is.
            raise PipelineJobError(
                f"pipeline job {job_id} is in state {raw_state}, a PipelineState this code "
                f"does not know; the job was left as it is [console: "
                f"{self.links(job_id)['console']}]"
            ) from None
        task_details = data.get("jobDetail", {}).get("taskDetails", [])
        error = data.get("error", {}).get("message") or None
        if state in (JobState.FAILED, JobState.CANCELLED, JobState.PAUSED):
            # The job's message is often generic ("the DAG failed because some tasks
            # failed"); the failing task's own error says what went wrong.
            details = [e for e in _failed_task_errors(task_details) if e not in (error or "")]
            error = "; ".join([e for e in [error, *details] if e]) or (
                f"Vertex reports {state.name} without an error message"
            )
        template_uri = data.get("templateUri", "")
        version = data.get("templateMetadata", {}).get("version", "")
        if not version and "/sha256:" in template_uri:
            version = template_uri.rsplit("/", 1)[-1]
        declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
        parameters = {
            name: _coerce(value, declared.get(name, {}).get("parameterType"))
            for name, value in data.get("runtimeConfig", {}).get("parameterValues", {}).items()
        }
        return PipelineJob(
            name=data["name"],
            job_id=job_id,
            pipeline=spec.get("pipelineInfo", {}).get("name", ""),
            state=state,
            labels=dict(data.get("labels", {})),
            create_time=_timestamp(data.get("createTime")) or datetime.fromtimestamp(0, UTC),
            start_time=_timestamp(data.get("startTime")),
            end_time=_timestamp(data.get("endTime")),
            template_uri=template_uri,
            template_version=version,
            parameters=parameters,
            # Like the local backend, outputs are recorded for a job that succeeded.
            outputs=resolve_outputs(job_id, spec, task_details)
            if state is JobState.SUCCEEDED
            else {},
            error=error,
            links=self.links(job_id),
        )


def _status(error: Any) -> str | None:
    """The ``error.status`` of a REST error body (e.g. "ALREADY_EXISTS"), if there is one."""
    response = getattr(error, "response", None)
    try:
        return response.json()["error"]["status"]
    except Exception:
        return None
