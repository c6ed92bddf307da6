"""A local stand-in for Vertex AI's PipelineService (REST, v1), for wire tests of the runner.

It implements exactly the four methods ``VertexPipelineRunner`` calls, with the documented
URLs and JSON shapes (the GAPIC REST transport's http rules and the v1 ``PipelineJob``
resource; google/cloud/aiplatform_v1/services/pipeline_service/transports/rest_base.py):

- ``POST /v1/projects/P/locations/L/pipelineJobs?pipelineJobId=ID`` with a ``PipelineJob``
  body; 409 ALREADY_EXISTS for a taken id.
- ``GET /v1/projects/P/locations/L/pipelineJobs/ID``; 404 NOT_FOUND.
- ``GET /v1/projects/P/locations/L/pipelineJobs`` with ``filter``, ``orderBy``,
  ``pageSize``, ``pageToken`` and ``readMask``; answers ``{"pipelineJobs", "nextPageToken"}``.
  The list view has no ``jobDetail`` (documented: "Not available in the list view").
- ``POST /v1/projects/P/locations/L/pipelineJobs/ID:cancel`` with ``{}``; a job that already
  ended is 400 FAILED_PRECONDITION, as Vertex answers for a pipeline "in state ... and
  cannot be canceled".

Errors are Google's ``{"error": {"code", "message", "status"}}``. Enums are numbers when the
client asks for ``$alt=json;enum-encoding=int`` (the GAPIC REST transport always does), names
otherwise.

Filters: only the forms the runner sends are implemented, joined by ``AND``:
``labels.KEY="VALUE"``, ``state="NAME"``, a parenthesised ``OR`` of ``state`` terms, and
``end_time>"RFC3339"``. Anything else is a 400 naming what is unsupported, so a test can
never pass on a filter this fake silently ignored. Unknown query parameters, ``orderBy``
fields and ``readMask`` paths are refused the same way.

Jobs move through states on a fake clock: ``plan`` gives a job its states over time since
it was created (and its outputs, its error); ``cancel`` moves it to CANCELLING, then
CANCELLED on the next read. A succeeded job gets Vertex's task details: the run itself as a
task named after the job, carrying the pipeline's outputs, and one task per task of the
root DAG carrying what it produced (output artifacts in ``outputs``, output parameters in
its execution's metadata as ``output:KEY``). The root DAG's tasks name the run task as
their ``parentTaskId``, or (``plan(..., parent_ids=False)``) carry none, as the reference
documents for a task "at the root level"; ``run_task=False`` leaves the run task out.

Every request is recorded (``requests``, ``calls(kind)``); ``fail_next`` injects faults;
``add_state`` makes a ``PipelineState`` newer than the client library.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.gcp.loopback import LoopbackServer

PIPELINE_STATES = {
    "PIPELINE_STATE_UNSPECIFIED": 0,
    "PIPELINE_STATE_QUEUED": 1,
    "PIPELINE_STATE_PENDING": 2,
    "PIPELINE_STATE_RUNNING": 3,
    "PIPELINE_STATE_SUCCEEDED": 4,
    "PIPELINE_STATE_FAILED": 5,
    "PIPELINE_STATE_CANCELLING": 6,
    "PIPELINE_STATE_CANCELLED": 7,
    "PIPELINE_STATE_PAUSED": 8,
}
TERMINAL = {"PIPELINE_STATE_SUCCEEDED", "PIPELINE_STATE_FAILED", "PIPELINE_STATE_CANCELLED"}
TASK_STATES = {
    "STATE_UNSPECIFIED": 0,
    "PENDING": 1,
    "RUNNING": 2,
    "SUCCEEDED": 3,
    "CANCEL_PENDING": 4,
    "CANCELLING": 5,
    "CANCELLED": 6,
    "FAILED": 7,
    "SKIPPED": 8,
    "NOT_TRIGGERED": 9,
}
EXECUTION_STATES = {
    "STATE_UNSPECIFIED": 0,
    "NEW": 1,
    "RUNNING": 2,
    "COMPLETE": 3,
    "FAILED": 4,
    "CACHED": 5,
    "CANCELLED": 6,
}
ARTIFACT_STATES = {"STATE_UNSPECIFIED": 0, "PENDING": 1, "LIVE": 2}
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# The PipelineJob resource's JSON fields (v1).
JOB_FIELDS = frozenset(
    {
        "name",
        "displayName",
        "createTime",
        "startTime",
        "endTime",
        "updateTime",
        "pipelineSpec",
        "state",
        "jobDetail",
        "error",
        "labels",
        "runtimeConfig",
        "encryptionSpec",
        "serviceAccount",
        "network",
        "reservedIpRanges",
        "pscInterfaceConfig",
        "templateUri",
        "templateMetadata",
        "scheduleName",
        "preflightValidations",
    }
)
OUTPUT_ONLY = frozenset(
    {"name", "createTime", "startTime", "endTime", "updateTime", "state", "jobDetail", "error"}
)
ORDER_FIELDS = {
    "create_time": "createTime",
    "update_time": "updateTime",
    "end_time": "endTime",
    "start_time": "startTime",
}
BILLING_LABEL = "vertex-ai-pipelines-run-billing-id"  # Vertex sets it on every job
JOB_ID = re.compile(r"^[a-z][-a-z0-9]{0,127}$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
AR_VERSION_URL = re.compile(r"^https://[a-z0-9-]+-kfp\.pkg\.dev/.+/(sha256:[0-9a-f]{64})$")
NETWORK = re.compile(r"^projects/[0-9]+/global/networks/[^/]+$")
DEFAULT_PAGE_SIZE = 100  # not documented for pipelineJobs.list; see the report


class FakeClock:
    """Seconds that pass only when ``sleep`` is called: share it between runner and fake."""

    def __init__(self, start: datetime = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)) -> None:
        self.now = start.timestamp()
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    monotonic = time

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # without the query
    query: dict[str, str]
    body: Any  # the parsed JSON body, or None
    kind: str  # create, get, list, cancel, or unknown
    status: int = 0  # what the fake answered


@dataclass
class _Plan:
    steps: list[tuple[float, str, str | None]]  # seconds after create, state, error message
    outputs: Mapping[str, Any] | None = None
    failed_task: tuple[str, str] | None = None  # task name, its error message
    run_task_outputs: bool = True  # does the run's own task carry the pipeline's outputs?
    parent_ids: bool = True  # do the root DAG's tasks carry the run task's id as parent?
    run_task: bool = True  # is the run's own task in the task details at all?


@dataclass
class _Fault:
    kind: str
    remaining: int
    status: int
    after_apply: bool  # handle the request, then answer the error (a lost response)
    message: str
    skip: int = 0  # requests of that kind answered normally before the fault


@dataclass
class _Job:
    data: dict[str, Any]
    created: float
    plan: _Plan
    applied: int = 0  # how many plan steps have happened
    cancel_at: float | None = None
    task_counter: int = field(default=0)


class _HttpError(Exception):
    def __init__(self, code: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or STATUS_NAMES.get(code, "UNKNOWN")


def _rfc3339(seconds: float) -> str:
    return (
        datetime.fromtimestamp(seconds, UTC)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


def _parse_time(text: str, what: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _HttpError(400, f"{what}: {text!r} is not an RFC 3339 timestamp") from None
    if value.tzinfo is None:
        raise _HttpError(400, f"{what}: {text!r} has no time zone")
    return value


class FakeVertex:
    def __init__(
        self,
        project: str = "acme-ml",
        location: str = "us-central1",
        *,
        clock: Callable[[], float] | None = None,
        project_number: str = "123456789012",
    ) -> None:
        self.project, self.location, self.project_number = project, location, project_number
        self.parent = f"projects/{project}/locations/{location}"
        self.clock = clock or FakeClock().time
        self.requests: list[RecordedRequest] = []
        self.unsupported: list[str] = []  # every request this fake refused as unmodelled
        self.cancel_delay = 0.0  # seconds from CANCELLING to CANCELLED
        self.states = dict(PIPELINE_STATES)  # name -> number, as this fake's API revision has
        self._jobs: dict[str, _Job] = {}
        self._plans: dict[str, _Plan] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._server: LoopbackServer | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeVertex:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = LoopbackServer(handler)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def __enter__(self) -> FakeVertex:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return self._server.url

    # -- test controls ---------------------------------------------------------------------

    def plan(
        self,
        job_id: str,
        *steps: tuple[float, str] | tuple[float, str, str],
        outputs: Mapping[str, Any] | None = None,
        failed_task: tuple[str, str] | None = None,
        run_task_outputs: bool = True,
        parent_ids: bool = True,
        run_task: bool = True,
    ) -> None:
        """How job ``job_id`` (created now or later) moves: ``(seconds after create, STATE)``
        or ``(seconds, STATE, error message)``; ``outputs`` by the pipeline's output names
        (artifacts as ``{"uri"?, "metadata"}``, parameters as values) for a SUCCEEDED job.
        ``parent_ids=False``: the root DAG's tasks carry no ``parentTaskId``;
        ``run_task=False``: the task details lack the run's own task."""
        parsed = []
        for step in steps:
            after, state, *error = step
            state = state if state.startswith("PIPELINE_STATE_") else f"PIPELINE_STATE_{state}"
            if state not in self.states:
                raise ValueError(f"unknown state {state}")
            parsed.append((float(after), state, error[0] if error else None))
        with self._lock:
            self._plans[job_id] = _Plan(
                parsed, outputs, failed_task, run_task_outputs, parent_ids, run_task
            )

    def add_state(self, name: str, number: int) -> None:
        """A ``PipelineState`` value newer than the client library, for ``plan``. The GAPIC
        REST transport asks for enums as numbers, so the client receives ``number``."""
        with self._lock:
            self.states[name] = number

    def add_job(
        self,
        job_id: str,
        *,
        state: str,
        labels: Mapping[str, str],
        created: float,
        ended: float | None = None,
        pipeline: str = "flight-delay-prediction",
    ) -> None:
        """A job someone else started (a schedule, a notebook), as it stands now."""
        state = state if state.startswith("PIPELINE_STATE_") else f"PIPELINE_STATE_{state}"
        data: dict[str, Any] = {
            "name": f"{self.parent}/pipelineJobs/{job_id}",
            "displayName": job_id,
            "createTime": _rfc3339(created),
            "updateTime": _rfc3339(ended or created),
            "state": state,
            "labels": {**labels, BILLING_LABEL: "4242"},
            "pipelineSpec": {"pipelineInfo": {"name": pipeline}, "root": {}},
            "runtimeConfig": {"gcsOutputDirectory": f"gs://elsewhere/{job_id}"},
        }
        if ended is not None:
            data["endTime"] = _rfc3339(ended)
        with self._lock:
            self._jobs[job_id] = _Job(data, created, _Plan([]))

    def fail_next(
        self,
        kind: str,
        count: int = 1,
        status: int = 503,
        *,
        after_apply: bool = False,
        message: str = "injected by the fake",
        skip: int = 0,
    ) -> None:
        """Answer the next ``count`` requests of ``kind`` (create, get, list, cancel) with
        ``status``, after ``skip`` more of them were answered normally; with ``after_apply``
        the request takes effect first (a lost response)."""
        with self._lock:
            self._faults.append(_Fault(kind, count, status, after_apply, message, skip))

    def calls(self, kind: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.kind == kind]

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's resource as a get would answer it now (enum names)."""
        with self._lock:
            job = self._jobs[job_id]
            self._advance(job)
            return json.loads(json.dumps(job.data))

    def job_ids(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    # -- the service -----------------------------------------------------------------------

    def handle(self, method: str, target: str, raw_body: bytes) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(target)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        kind, match = self._route(method, parts.path)
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = None
        with self._lock:
            fault = next((f for f in self._faults if f.kind == kind and f.remaining), None)
            if fault and fault.skip:
                fault.skip -= 1
                fault = None
            elif fault:
                fault.remaining -= 1
            try:
                if fault and not fault.after_apply:
                    raise _HttpError(fault.status, fault.message)
                if kind == "unknown":
                    raise _HttpError(404, f"fake_vertex: no method for {method} {parts.path}")
                if raw_body and body is None:
                    raise _HttpError(400, "Invalid JSON payload received")
                status, answer = 200, self._dispatch(kind, match, query, body)
                if fault:
                    raise _HttpError(fault.status, fault.message)
            except _HttpError as error:
                if error.code == 400 and error.message.startswith("fake_vertex"):
                    self.unsupported.append(error.message)
                status = error.code
                answer = {
                    "error": {"code": error.code, "message": error.message, "status": error.status}
                }
            if query.get("$alt", "").endswith("enum-encoding=int") and status == 200:
                answer = _numeric_enums(answer, self.states)
            self.requests.append(RecordedRequest(method, parts.path, query, body, kind, status))
            return status, answer

    def _route(self, method: str, path: str) -> tuple[str, re.Match | None]:
        base = r"^/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/pipelineJobs"
        for kind, verb, pattern in (
            ("create", "POST", base + "$"),
            ("list", "GET", base + "$"),
            ("get", "GET", base + r"/(?P<job>[^/:]+)$"),
            ("cancel", "POST", base + r"/(?P<job>[^/:]+):cancel$"),
        ):
            match = re.match(pattern, path)
            if match and method == verb:
                return kind, match
        return "unknown", None

    def _dispatch(
        self, kind: str, match: re.Match, query: dict[str, str], body: Any
    ) -> dict[str, Any]:
        if (match["project"], match["location"]) != (self.project, self.location):
            raise _HttpError(
                403,
                f"Permission denied on resource project {match['project']} "
                f"(this fake serves {self.parent})",
            )
        allowed = {
            "create": {"pipelineJobId"},
            "get": set(),
            "list": {"filter", "pageSize", "pageToken", "orderBy", "readMask"},
            "cancel": set(),
        }[kind] | {"$alt"}
        unknown = sorted(set(query) - allowed)
        if unknown:
            raise _HttpError(400, f"fake_vertex does not implement query parameters {unknown}")
        if kind == "create":
            return self._create(query, body)
        if kind == "list":
            return self._list(query)
        job = self._jobs.get(match["job"])
        if job is None:
            raise _HttpError(
                404, f'PipelineJob "{self.parent}/pipelineJobs/{match["job"]}" not found'
            )
        self._advance(job)
        if kind == "get":
            return json.loads(json.dumps(job.data))
        return self._cancel(job, body)

    # -- methods -----------------------------------------------------------------------------

    def _create(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        job_id = query.get("pipelineJobId")
        if not job_id:
            raise _HttpError(400, "fake_vertex: the runner must send pipelineJobId")
        if not JOB_ID.match(job_id):
            raise _HttpError(400, f"pipelineJobId {job_id!r} must match [a-z][-a-z0-9]{{0,127}}")
        if not isinstance(body, dict):
            raise _HttpError(400, "the request body must be a PipelineJob")
        unknown = sorted(set(body) - JOB_FIELDS)
        if unknown:
            raise _HttpError(400, f'Invalid JSON payload received. Unknown name "{unknown[0]}"')
        if job_id in self._jobs:
            raise _HttpError(
                409, f'PipelineJob "{self.parent}/pipelineJobs/{job_id}" already exists'
            )
        spec = body.get("pipelineSpec")
        if not spec and not body.get("templateUri"):
            raise _HttpError(400, "a PipelineJob needs pipelineSpec or templateUri")
        runtime = body.get("runtimeConfig", {})
        if not str(runtime.get("gcsOutputDirectory", "")).startswith("gs://"):
            raise _HttpError(400, "runtimeConfig.gcsOutputDirectory must be a gs:// path")
        for key, value in body.get("labels", {}).items():
            if not LABEL_KEY.match(key) or not LABEL_VALUE.match(str(value)):
                raise _HttpError(400, f"invalid label {key}={value!r}")
        if body.get("network") and not NETWORK.match(body["network"]):
            raise _HttpError(
                400, f"network {body['network']!r} is not projects/NUMBER/global/networks/NAME"
            )
        if body.get("serviceAccount") and "@" not in body["serviceAccount"]:
            raise _HttpError(400, f"serviceAccount {body['serviceAccount']!r} is not an email")
        if spec:
            declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
            given = runtime.get("parameterValues", {})
            unknown = sorted(set(given) - set(declared))
            missing = sorted(
                name
                for name, d in declared.items()
                if name not in given and not d.get("isOptional") and "defaultValue" not in d
            )
            if unknown or missing:
                raise _HttpError(400, f"parameters: unknown {unknown}, missing {missing}")
        now = self.clock()
        plan = self._plans.get(job_id) or _Plan([(0.0, "PIPELINE_STATE_PENDING", None)])
        data = {k: v for k, v in body.items() if k not in OUTPUT_ONLY}
        data.update(
            name=f"{self.parent}/pipelineJobs/{job_id}",
            createTime=_rfc3339(now),
            updateTime=_rfc3339(now),
            state="PIPELINE_STATE_PENDING",
            labels={
                **body.get("labels", {}),
                BILLING_LABEL: str(int(hashlib.sha256(job_id.encode()).hexdigest()[:10], 16)),
            },
        )
        version = AR_VERSION_URL.match(body.get("templateUri", ""))
        if version:
            data["templateMetadata"] = {"version": version.group(1)}
        job = _Job(data, now, plan)
        self._jobs[job_id] = job
        self._advance(job)
        return json.loads(json.dumps(job.data))

    def _cancel(self, job: _Job, body: Any) -> dict[str, Any]:
        if body not in ({}, None):
            raise _HttpError(400, "fake_vertex: a cancel request's body is {}")
        state = job.data["state"]
        if state in TERMINAL:
            raise _HttpError(
                400,
                f'The PipelineJob "{job.data["name"]}" is in state {state} and cannot be canceled.',
                "FAILED_PRECONDITION",
            )
        if state != "PIPELINE_STATE_CANCELLING":
            self._set(job, "PIPELINE_STATE_CANCELLING", self.clock())
            job.cancel_at = self.clock() + self.cancel_delay
        return {}

    def _list(self, query: dict[str, str]) -> dict[str, Any]:
        match = _parse_filter(query.get("filter", ""))
        order = _parse_order(query.get("orderBy", ""))
        mask = [p for p in query.get("readMask", "").split(",") if p]
        for path in mask:
            if path.split(".")[0] not in JOB_FIELDS:
                raise _HttpError(400, f"readMask: unknown field {path!r}")
        try:
            size = int(query.get("pageSize") or DEFAULT_PAGE_SIZE)
        except ValueError:
            raise _HttpError(400, f"pageSize {query['pageSize']!r} is not a number") from None
        if size <= 0:
            size = DEFAULT_PAGE_SIZE
        # A page token is only good for the query that made it, as Google's APIs insist.
        fingerprint = hashlib.sha256(
            json.dumps([query.get("filter"), query.get("orderBy"), query.get("readMask")]).encode()
        ).hexdigest()[:16]
        offset = 0
        if query.get("pageToken"):
            try:
                token = json.loads(base64.urlsafe_b64decode(query["pageToken"]))
                offset, made_for = int(token["offset"]), token["query"]
            except (ValueError, KeyError, TypeError):
                raise _HttpError(400, "invalid page token") from None
            if made_for != fingerprint:
                raise _HttpError(400, "the page token belongs to another query")
        for job in self._jobs.values():
            self._advance(job)
        jobs = [job.data for job in self._jobs.values() if match(job.data)]
        jobs.sort(key=lambda data: data["name"])
        for field_name, descending in reversed(order):
            # A job without the time (not ended yet) sorts first, ascending.
            jobs.sort(key=lambda data, f=field_name: data.get(f) or "", reverse=descending)
        page = jobs[offset : offset + size]
        answer: dict[str, Any] = {}
        if page:
            answer["pipelineJobs"] = [_project(data, mask) for data in page]
        if offset + size < len(jobs):
            token = json.dumps({"offset": offset + size, "query": fingerprint})
            answer["nextPageToken"] = base64.urlsafe_b64encode(token.encode()).decode()
        return answer

    # -- how jobs move ---------------------------------------------------------------------

    def _advance(self, job: _Job) -> None:
        now = self.clock()
        if job.cancel_at is not None:
            if now >= job.cancel_at and job.data["state"] == "PIPELINE_STATE_CANCELLING":
                self._set(job, "PIPELINE_STATE_CANCELLED", job.cancel_at, "Pipeline job cancelled")
            return  # a cancelled job follows its plan no further
        steps = job.plan.steps
        while job.applied < len(steps) and job.created + steps[job.applied][0] <= now:
            after, state, error = steps[job.applied]
            job.applied += 1
            if job.data["state"] in TERMINAL:
                continue
            self._set(job, state, job.created + after, error)

    def _set(self, job: _Job, state: str, when: float, error: str | None = None) -> None:
        data = job.data
        data["state"] = state
        data["updateTime"] = _rfc3339(when)
        if state in ("PIPELINE_STATE_RUNNING",) and "startTime" not in data:
            data["startTime"] = _rfc3339(when)
        if state in TERMINAL:
            data.setdefault("startTime", _rfc3339(when))
            data["endTime"] = _rfc3339(when)
        if state == "PIPELINE_STATE_SUCCEEDED":
            data["jobDetail"] = {"taskDetails": self._task_details(job)}
        elif state == "PIPELINE_STATE_FAILED":
            data["error"] = {
                "code": 9,
                "message": error or "The DAG failed because some tasks failed.",
            }
            if job.plan.failed_task:
                data["jobDetail"] = {"taskDetails": self._failed_task_details(job)}
        elif state == "PIPELINE_STATE_CANCELLED":
            data["error"] = {"code": 1, "message": error or "CANCELLED"}
        elif error:
            data["error"] = {"code": 2, "message": error}

    def _task(self, job: _Job, name: str, parent: str | None, schema: str) -> dict[str, Any]:
        # A task of the root DAG names the run task as parent, or none ("root level").
        parent = parent if job.plan.parent_ids else None
        job.task_counter += 1
        task_id = str(1000 + job.task_counter)
        task: dict[str, Any] = {
            "taskId": task_id,
            "taskName": name,
            "state": "SUCCEEDED",
            "execution": {
                "name": f"{self.parent}/metadataStores/default/executions/{task_id}",
                "displayName": name,
                "schemaTitle": schema,
                "state": "COMPLETE",
                "metadata": {},
            },
            "outputs": {},
        }
        if parent is not None:
            task["parentTaskId"] = parent
        return task

    def _artifact(self, job: _Job, task: Mapping[str, Any], key: str, value: Any, title: str):
        value = value if isinstance(value, Mapping) else {}
        root = job.data["runtimeConfig"]["gcsOutputDirectory"].rstrip("/")
        job_id = job.data["name"].rsplit("/", 1)[-1]
        number = job.task_counter * 100 + len(task["outputs"])
        return {
            "name": f"{self.parent}/metadataStores/default/artifacts/{number}",
            "displayName": key,
            # The documented layout: {job_id}/{task_id}/{output_key} under the output directory.
            "uri": value.get("uri")
            or f"{root}/{self.project_number}/{job_id}/{task['taskId']}/{key}",
            "schemaTitle": value.get("type") or title,
            "schemaVersion": "0.0.1",
            "state": "LIVE",
            "metadata": dict(value.get("metadata", {})),
        }

    def _task_details(self, job: _Job) -> list[dict[str, Any]]:
        job_id = job.data["name"].rsplit("/", 1)[-1]
        spec = job.data.get("pipelineSpec", {})
        root = spec.get("root", {})
        declared = root.get("outputDefinitions", {})
        selectors = root.get("dag", {}).get("outputs", {})
        outputs = dict(job.plan.outputs or {})
        names = set(declared.get("artifacts", {})) | set(declared.get("parameters", {}))
        if set(outputs) - names:
            raise ValueError(f"outputs {sorted(set(outputs) - names)} are not declared by {job_id}")
        run = self._task(job, job_id, None, "system.Run")
        tasks = {
            name: self._task(job, name, run["taskId"], "system.ContainerExecution")
            for name in root.get("dag", {}).get("tasks", {})
        }
        for name, definition in declared.get("artifacts", {}).items():
            if name not in outputs:
                continue
            title = definition.get("artifactType", {}).get("schemaTitle", "system.Artifact")
            for selector in (
                selectors.get("artifacts", {}).get(name, {}).get("artifactSelectors", [])
            ):
                producer, key = tasks[selector["producerSubtask"]], selector["outputArtifactKey"]
                artifact = self._artifact(job, producer, key, outputs[name], title)
                producer["outputs"][key] = {"artifacts": [artifact]}
                if job.plan.run_task_outputs:
                    run["outputs"][name] = {"artifacts": [artifact]}
        for name in declared.get("parameters", {}):
            if name not in outputs:
                continue
            source = selectors.get("parameters", {}).get(name, {}).get("valueFromParameter", {})
            producer = tasks[source["producerSubtask"]]
            producer["execution"]["metadata"][f"output:{source['outputParameterKey']}"] = outputs[
                name
            ]
            if job.plan.run_task_outputs:
                run["execution"]["metadata"][f"output:{name}"] = outputs[name]
        return [run, *tasks.values()] if job.plan.run_task else list(tasks.values())

    def _failed_task_details(self, job: _Job) -> list[dict[str, Any]]:
        job_id = job.data["name"].rsplit("/", 1)[-1]
        name, message = job.plan.failed_task or ("", "")
        run = self._task(job, job_id, None, "system.Run")
        run["state"], run["execution"]["state"] = "FAILED", "FAILED"
        task = self._task(job, name, run["taskId"], "system.ContainerExecution")
        task["state"], task["execution"]["state"] = "FAILED", "FAILED"
        task["error"] = {"code": 9, "message": message}
        return [run, task] if job.plan.run_task else [task]


# -- filters, ordering, masks -------------------------------------------------------------

_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|>=|<=|!=|=|>|<|[A-Za-z_][A-Za-z0-9_.\-]*)')


def _unsupported(what: str) -> _HttpError:
    return _HttpError(400, f"fake_vertex does not implement {what}")


def _tokens(text: str) -> list[str]:
    tokens, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise _unsupported(f"the filter syntax at {text[position:]!r}")
        tokens.append(match.group(1))
        position = match.end()
    return tokens


def _comparison(field_name: str, op: str, literal: str) -> Callable[[dict[str, Any]], bool]:
    if not (literal.startswith('"') and literal.endswith('"')):
        raise _unsupported(f"the unquoted value in {field_name}{op}{literal}")
    value = json.loads(literal)
    if field_name.startswith("labels.") and op == "=":
        key = field_name.removeprefix("labels.")
        return lambda data: data.get("labels", {}).get(key) == value
    if field_name == "state" and op == "=":
        if value not in PIPELINE_STATES:
            raise _HttpError(400, f"unknown state {value!r} in the filter")
        return lambda data: data.get("state") == value
    if field_name == "end_time" and op == ">":
        bound = _parse_time(value, "filter end_time")
        return lambda data: (
            bool(data.get("endTime")) and (_parse_time(data["endTime"], "endTime") > bound)
        )
    raise _unsupported(f"the filter term {field_name}{op}{literal}")


def _parse_filter(text: str) -> Callable[[dict[str, Any]], bool]:
    """``term (AND term)*``; a term is a comparison or ``(comparison (OR comparison)*)``."""
    tokens = _tokens(text)
    terms: list[Callable[[dict[str, Any]], bool]] = []
    position = 0

    def comparison() -> Callable[[dict[str, Any]], bool]:
        nonlocal position
        if position + 3 > len(tokens):
            raise _unsupported(f"the filter {text!r}")
        field_name, op, literal = tokens[position : position + 3]
        position += 3
        return _comparison(field_name, op, literal)

    while position < len(tokens):
        if terms:
            if tokens[position] != "AND":
                raise _unsupported(f"{tokens[position]!r} between filter terms in {text!r}")
            position += 1
        if position < len(tokens) and tokens[position] == "(":
            position += 1
            alternatives = [comparison()]
            while position < len(tokens) and tokens[position] == "OR":
                position += 1
                alternatives.append(comparison())
            if position >= len(tokens) or tokens[position] != ")":
                raise _unsupported(f"the parenthesised filter in {text!r}")
            position += 1
            terms.append(lambda data, a=tuple(alternatives): any(f(data) for f in a))
        else:
            terms.append(comparison())
    return lambda data: all(term(data) for term in terms)


def _parse_order(text: str) -> list[tuple[str, bool]]:
    if not text.strip():
        return [("createTime", True)]  # documented default: create time, descending
    order = []
    for part in text.split(","):
        words = part.split()
        if not words or words[0] not in ORDER_FIELDS or words[1:] not in ([], ["desc"], ["asc"]):
            raise _HttpError(400, f"orderBy: {part.strip()!r} is not a supported field")
        order.append((ORDER_FIELDS[words[0]], words[1:] == ["desc"]))
    return order


def _project(data: Mapping[str, Any], mask: Iterable[str]) -> dict[str, Any]:
    """The list view of a job: the masked paths, or everything but ``jobDetail``."""
    mask = list(mask)
    if not mask:
        return {k: v for k, v in json.loads(json.dumps(data)).items() if k != "jobDetail"}
    result: dict[str, Any] = {}
    for path in mask:
        source: Any = data
        keys = path.split(".")
        for key in keys:
            source = source.get(key) if isinstance(source, Mapping) else None
        if source is None:
            continue
        target = result
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = json.loads(json.dumps(source))
    return result


def _numeric_enums(answer: dict[str, Any], states: Mapping[str, int]) -> dict[str, Any]:
    """What ``$alt=json;enum-encoding=int`` asks for: every enum as its number."""

    def job(data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        if "state" in data:
            data["state"] = states[data["state"]]
        tasks = data.get("jobDetail", {}).get("taskDetails")
        if tasks is not None:
            data["jobDetail"] = {**data["jobDetail"], "taskDetails": [task(t) for t in tasks]}
        return data

    def task(data: dict[str, Any]) -> dict[str, Any]:
        data = json.loads(json.dumps(data))
        data["state"] = TASK_STATES[data["state"]]
        data["execution"]["state"] = EXECUTION_STATES[data["execution"]["state"]]
        for artifacts in data.get("outputs", {}).values():
            for artifact in artifacts.get("artifacts", []):
                artifact["state"] = ARTIFACT_STATES[artifact["state"]]
        return data

    if "pipelineJobs" in answer:
        return {**answer, "pipelineJobs": [job(j) for j in answer["pipelineJobs"]]}
    if "name" in answer:
        return job(answer)
    return answer


class _Handler(BaseHTTPRequestHandler):
    fake: FakeVertex

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, answer = self.fake.handle(self.command, self.path, raw)
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass
