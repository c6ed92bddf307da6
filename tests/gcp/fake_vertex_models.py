"""A local stand-in for Vertex AI's ModelService (REST, v1), for wire tests of the model
registry backend.

It implements exactly what ``VertexModelRegistry`` calls, with the URLs of the GAPIC REST
transport's http rules (google/cloud/aiplatform_v1/services/model_service/transports/
rest_base.py and rest.py) and the JSON shapes of the v1 proto types (types/model.py,
types/model_service.py), cross-checked against the public REST reference:

- https://cloud.google.com/vertex-ai/docs/reference/rest/v1/projects.locations.models
  (the Model resource: versionId "an auto-incrementing decimal number in string
  representation"; versionAliases "[a-z][a-zA-Z0-9-]{0,126}[a-z0-9] to distinguish from
  versionId. A default version alias will be created for the first version of the model";
  artifactUri "the path to the directory containing the Model artifact"; containerSpec
  "Input only"; versionDescription "The description of this version"; labels),
- .../projects.locations.models/upload (``POST /v1/{parent}/models:upload``, body
  ``{model, modelId, parentModel, serviceAccount}``, answers an Operation whose response is
  an UploadModelResponse ``{model, modelVersionId}``; modelId: "up to 63 characters, and
  valid characters are [a-z0-9_-]. The first character cannot be a number or hyphen";
  parentModel: "Only specify this field when uploading a new version"),
- .../projects.locations.models/get (``GET /v1/{name}``; a name may carry ``@VERSION`` or
  ``@ALIAS``; without one it is the default version),
- .../projects.locations.models/mergeVersionAliases (``POST /v1/{name}:mergeVersionAliases``
  on a name "with a version id explicitly included", body ``{versionAliases}``, "-golden"
  removes an alias, adding and removing the same one cancel out; answers the Model),
- .../projects.locations.models/listVersions (``GET /v1/{name}:listVersions`` with
  ``pageSize``, ``pageToken``, ``filter``, ``readMask``, ``orderBy``; answers
  ``{models, nextPageToken}``, each model's name carrying its version id),
- https://cloud.google.com/vertex-ai/docs/model-registry/model-alias ("If you apply an
  existing alias that is used in another model version, the alias is removed from that
  version"; "One version of a model is required to carry the default alias at all times").

Polling an operation: the GAPIC REST operations client of this library version sends
``GET /ui/{operation name}`` (the first of aiplatform's GetOperation http rules that
matches); the reference documents ``GET /v1/{name}`` (projects.locations.models.operations
.get). Both are served, and the recorded request keeps the path the client used.

``operation_polls`` chooses the Operation shape an upload answers: 0, already ``done``
with its ``response``; N, not done, and done on the N-th poll. The version exists from
the moment its operation is done, as on Vertex.

Not modelled, and refused with a 400 naming it, so that a test cannot pass on something
this fake ignored: any query parameter but ``pageSize``/``pageToken`` (``filter``,
``readMask``, ``orderBy``), any request field or Model field the backend does not send
(``serviceAccount``, ``metadata``, ``predictSchemata``, ...), an upload with both or
neither of ``modelId`` and ``parentModel``, and a merge on an alias instead of a version.
The reference documents no order for listVersions: this fake answers newest first, so
that a client must order versions itself; nor a default page size (100 here).

Errors are Google's ``{"error": {"code", "message", "status"}}``. Enums are numbers when the
client asks for ``$alt=json;enum-encoding=int`` (the GAPIC REST transport always does).
Every request is recorded (``requests``, ``calls(kind)``); ``fail_next`` injects faults.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.gcp.loopback import LoopbackServer

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
# google.rpc.Code numbers, for an operation's error.
RPC_CODES = {"INVALID_ARGUMENT": 3, "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "INTERNAL": 13}
MODEL_ID = re.compile(r"^[a-z_][a-z0-9_-]{0,62}$")
ALIAS = re.compile(r"^[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,64}$")
DEFAULT_ALIAS = "default"
DEFAULT_PAGE_SIZE = 100  # not documented for listVersions
# What an upload may carry; everything else is refused as not modelled.
UPLOAD_FIELDS = frozenset({"model", "modelId", "parentModel"})
MODEL_INPUT_FIELDS = frozenset(
    {
        "displayName",
        "versionDescription",
        "versionAliases",
        "labels",
        "artifactUri",
        "containerSpec",
    }
)
CONTAINER_FIELDS = frozenset({"imageUri"})
DEPLOYMENT_RESOURCES_TYPES = {"DEDICATED_RESOURCES": 1}
OPERATION_METADATA = "type.googleapis.com/google.cloud.aiplatform.v1.UploadModelOperationMetadata"
UPLOAD_RESPONSE = "type.googleapis.com/google.cloud.aiplatform.v1.UploadModelResponse"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # without the query, percent-decoded
    query: dict[str, str]
    body: Any  # the parsed JSON body, or None
    kind: str  # upload, get, merge, list, operation, or unknown
    status: int = 0  # what the fake answered


@dataclass
class _Fault:
    status: int
    remaining: int
    kind: str | None  # None: any request
    after_apply: bool  # handle the request, then answer the error (a lost answer)
    message: str


@dataclass
class _Model:
    model_id: str
    created: str
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)  # alias -> version


@dataclass
class _Operation:
    name: str
    created: str
    polls_left: int
    upload: dict[str, Any]  # the request, applied when the operation is done
    result: dict[str, Any] | None = None  # response or error, once done


class _HttpError(Exception):
    def __init__(self, code: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or STATUS_NAMES.get(code, "UNKNOWN")


def _unsupported(what: str) -> _HttpError:
    return _HttpError(400, f"fake_vertex_models does not implement {what}")


class FakeVertexModels:
    def __init__(
        self,
        project: str = "acme-ml",
        location: str = "us-central1",
        *,
        project_number: str = "123456789012",
        operation_polls: int = 0,
    ) -> None:
        self.project, self.location, self.project_number = project, location, project_number
        self.parent = f"projects/{project}/locations/{location}"
        # Vertex names the resources it returns with the project's number.
        self.number_parent = f"projects/{project_number}/locations/{location}"
        self.operation_polls = operation_polls
        self.requests: list[RecordedRequest] = []
        self.unsupported: list[str] = []  # every request this fake refused as unmodelled
        self._models: dict[str, _Model] = {}
        self._operations: dict[str, _Operation] = {}
        self._operation_errors: list[tuple[str, str]] = []
        self._faults: list[_Fault] = []
        self._counter = 0
        self._start = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
        self._lock = threading.RLock()
        self._server: LoopbackServer | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeVertexModels:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = LoopbackServer(handler)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def __enter__(self) -> FakeVertexModels:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return self._server.url

    # -- test controls ---------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        times: int = 1,
        *,
        kind: str | None = None,
        after_apply: bool = False,
        message: str = "injected by the fake",
    ) -> None:
        """Answer the next ``times`` requests (of ``kind``: upload, get, merge, list,
        operation; None for any) with ``status``; with ``after_apply`` the request takes
        effect first (an answer lost on the way back)."""
        with self._lock:
            self._faults.append(_Fault(status, times, kind, after_apply, message))

    def fail_next_operation(self, status: str = "INTERNAL", message: str = "upload failed") -> None:
        """The next upload's operation ends with this error (google.rpc.Status) instead of a
        new version."""
        with self._lock:
            self._operation_errors.append((status, message))

    def calls(self, kind: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.kind == kind]

    def aliases(self, model_id: str) -> dict[str, str]:
        """alias -> version id, as Vertex holds them now."""
        with self._lock:
            model = self._models[model_id]
            return {alias: str(version) for alias, version in sorted(model.aliases.items())}

    def version_ids(self, model_id: str) -> list[str]:
        with self._lock:
            model = self._models.get(model_id)
            return [str(v) for v in sorted(model.versions)] if model else []

    # -- the service -----------------------------------------------------------------------

    def handle(self, method: str, target: str, raw_body: bytes) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(target)
        path = unquote(parts.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        kind, match = self._route(method, path)
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = None
        with self._lock:
            fault = next((f for f in self._faults if f.remaining and f.kind in (None, kind)), None)
            if fault:
                fault.remaining -= 1
            try:
                if fault and not fault.after_apply:
                    raise _HttpError(fault.status, fault.message)
                if kind == "unknown":
                    raise _HttpError(404, f"fake_vertex_models: no method for {method} {path}")
                if raw_body and body is None:
                    raise _HttpError(400, "Invalid JSON payload received")
                status, answer = 200, self._dispatch(kind, match, query, body)
                if fault:
                    raise _HttpError(fault.status, fault.message)
            except _HttpError as error:
                if error.code == 400 and error.message.startswith("fake_vertex_models"):
                    self.unsupported.append(error.message)
                status = error.code
                answer = {
                    "error": {"code": error.code, "message": error.message, "status": error.status}
                }
            if query.get("$alt", "").endswith("enum-encoding=int") and status == 200:
                answer = _numeric_enums(answer)
            self.requests.append(RecordedRequest(method, path, query, body, kind, status))
            return status, answer

    def _route(self, method: str, path: str) -> tuple[str, re.Match | None]:
        location = r"projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
        model = location + r"/models/(?P<model>[^/:@]+)(?:@(?P<version>[^/:@]+))?"
        for kind, verb, pattern in (
            ("upload", "POST", rf"^/v1/{location}/models:upload$"),
            ("get", "GET", rf"^/v1/{model}$"),
            ("merge", "POST", rf"^/v1/{model}:mergeVersionAliases$"),
            ("list", "GET", rf"^/v1/{model}:listVersions$"),
            (
                "operation",
                "GET",
                rf"^/(?:v1|ui)/{location}(?:/models/(?P<model>[^/:@]+))?"
                r"/operations/(?P<operation>[^/:]+)$",
            ),
        ):
            match = re.match(pattern, path)
            if match and method == verb:
                return kind, match
        return "unknown", None

    def _dispatch(
        self, kind: str, match: re.Match, query: dict[str, str], body: Any
    ) -> dict[str, Any]:
        if match["project"] not in (self.project, self.project_number) or (
            match["location"] != self.location
        ):
            raise _HttpError(
                403,
                f"Permission denied on resource project {match['project']} "
                f"(this fake serves {self.parent})",
            )
        allowed = {"list": {"pageSize", "pageToken"}}.get(kind, set()) | {"$alt"}
        unknown = sorted(set(query) - allowed)
        if unknown:
            raise _unsupported(f"query parameters {unknown} on {kind}")
        if kind in ("get", "list", "operation") and body not in (None, {}):
            raise _unsupported(f"a body on {kind}")
        if kind == "upload":
            return self._upload(body)
        if kind == "operation":
            return self._operation(match)
        model = self._models.get(match["model"])
        if model is None:
            raise _HttpError(404, f'Model "{self._name(match["model"])}" not found')
        if kind == "list":
            if match["version"] is not None:
                raise _unsupported("listVersions on a model version")
            return self._list(model, query)
        if kind == "merge":
            return self._merge(model, match["version"], body)
        return self._version(model, self._resolve(model, match["version"]))

    # -- names, times ----------------------------------------------------------------------

    def _name(self, model_id: str) -> str:
        return f"{self.number_parent}/models/{model_id}"

    def _now(self) -> str:
        # A clock that moves a second per event: versions get distinct, ordered times.
        self._counter += 1
        moment = self._start + timedelta(seconds=self._counter)
        return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")

    def _resolve(self, model: _Model, version: str | None) -> int:
        """The version a ``@VERSION``, ``@ALIAS`` or bare name stands for; 404 if none."""
        key = DEFAULT_ALIAS if version is None else version
        number = int(key) if key.isdigit() else model.aliases.get(key)
        if number is None or number not in model.versions:
            raise _HttpError(404, f'Model "{self._name(model.model_id)}@{key}" not found')
        return number

    def _version(self, model: _Model, number: int, *, listed: bool = False) -> dict[str, Any]:
        data = copy.deepcopy(model.versions[number])
        data["versionAliases"] = sorted(a for a, v in model.aliases.items() if v == number)
        if listed:  # "In the returned Model name field, version ID ... will be included"
            data["name"] = f"{data['name']}@{number}"
        return data

    # -- methods -----------------------------------------------------------------------------

    def _upload(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _HttpError(400, "the request body must be an UploadModelRequest")
        unknown = sorted(set(body) - UPLOAD_FIELDS)
        if unknown:
            raise _unsupported(f"UploadModelRequest fields {unknown}")
        model_id, parent_model = body.get("modelId"), body.get("parentModel")
        if bool(model_id) == bool(parent_model):
            raise _unsupported("an upload with both or neither of modelId and parentModel")
        model = body.get("model")
        if not isinstance(model, dict):
            raise _HttpError(400, "model is required")
        unknown = sorted(set(model) - MODEL_INPUT_FIELDS)
        if unknown:
            raise _unsupported(f"Model fields {unknown}")
        unknown = sorted(set(model.get("containerSpec", {})) - CONTAINER_FIELDS)
        if unknown:
            raise _unsupported(f"ModelContainerSpec fields {unknown}")
        if not model.get("displayName"):
            raise _HttpError(400, "model.displayName is required")
        if len(model["displayName"]) > 128:
            raise _HttpError(400, "model.displayName is longer than 128 characters")
        if not model.get("containerSpec", {}).get("imageUri"):
            raise _HttpError(400, "model.containerSpec.imageUri is required for a custom model")
        if not str(model.get("artifactUri", "")).startswith("gs://"):
            raise _HttpError(400, "model.artifactUri must be a gs:// directory")
        for alias in model.get("versionAliases", []):
            if not ALIAS.fullmatch(alias):
                raise _HttpError(400, f"version alias {alias!r} is invalid")
        for key, value in model.get("labels", {}).items():
            if not LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(str(value)):
                raise _HttpError(400, f"invalid label {key}={value!r}")
        if model_id is not None:
            if not MODEL_ID.fullmatch(model_id):
                raise _HttpError(400, f"modelId {model_id!r} must match [a-z_][a-z0-9_-]{{0,62}}")
            if model_id in self._models or any(
                op.upload["model_id"] == model_id and op.result is None
                for op in self._operations.values()
            ):
                raise _HttpError(409, f'Model "{self._name(model_id)}" already exists')
        else:
            found = re.fullmatch(
                r"projects/([^/]+)/locations/([^/]+)/models/([^/@:]+)", parent_model
            )
            if not found:
                raise _HttpError(400, f"parentModel {parent_model!r} is not a model name")
            if found[1] not in (self.project, self.project_number) or found[2] != self.location:
                raise _HttpError(400, f"parentModel {parent_model!r} is not in {self.parent}")
            model_id = found[3]
            if model_id not in self._models:
                raise _HttpError(404, f'Model "{self._name(model_id)}" not found')
        self._counter += 1
        name = f"{self._name(model_id)}/operations/{4000 + self._counter}"
        now = self._now()
        operation = _Operation(
            name, now, self.operation_polls, {"model_id": model_id, "model": model}
        )
        self._operations[name] = operation
        if operation.polls_left == 0:
            self._finish(operation)
        return self._operation_json(operation)

    def _operation(self, match: re.Match) -> dict[str, Any]:
        model = f"/models/{match['model']}" if match["model"] else ""
        name = f"{self.number_parent}{model}/operations/{match['operation']}"
        operation = self._operations.get(name)
        if operation is None:
            raise _HttpError(404, f'Operation "{name}" not found')
        if operation.result is None:
            operation.polls_left -= 1
            if operation.polls_left <= 0:
                self._finish(operation)
        return self._operation_json(operation)

    def _finish(self, operation: _Operation) -> None:
        model_id, request = operation.upload["model_id"], operation.upload["model"]
        if self._operation_errors:
            status, message = self._operation_errors.pop(0)
            operation.result = {"error": {"code": RPC_CODES.get(status, 2), "message": message}}
            return
        now = self._now()
        model = self._models.setdefault(model_id, _Model(model_id, now))
        number = max(model.versions, default=0) + 1
        model.versions[number] = {
            "name": self._name(model_id),
            "versionId": str(number),
            "versionCreateTime": now,
            "versionUpdateTime": now,
            "displayName": request["displayName"],
            "versionDescription": request.get("versionDescription", ""),
            "artifactUri": request["artifactUri"],
            "labels": dict(request.get("labels", {})),
            "supportedDeploymentResourcesTypes": ["DEDICATED_RESOURCES"],
            "createTime": model.created,
            "updateTime": now,
            "etag": hashlib.sha256(f"{model_id}@{number}".encode()).hexdigest()[:16],
        }
        aliases = list(request.get("versionAliases", []))
        if not model.aliases:
            aliases.append(DEFAULT_ALIAS)  # the first version gets the default alias
        for alias in aliases:
            model.aliases[alias] = number  # taken from whichever version held it
        operation.result = {
            "response": {
                "@type": UPLOAD_RESPONSE,
                "model": self._name(model_id),
                "modelVersionId": str(number),
            }
        }

    def _operation_json(self, operation: _Operation) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": operation.name,
            "metadata": {
                "@type": OPERATION_METADATA,
                "genericMetadata": {"createTime": operation.created, "updateTime": self._now()},
            },
        }
        if operation.result is not None:
            data["done"] = True
            data.update(copy.deepcopy(operation.result))
        return data

    def _merge(self, model: _Model, version: str | None, body: Any) -> dict[str, Any]:
        if version is None or not version.isdigit():
            raise _unsupported("mergeVersionAliases on a name without a version id")
        number = self._resolve(model, version)
        if not isinstance(body, dict) or set(body) != {"versionAliases"}:
            raise _unsupported(f"a mergeVersionAliases body other than versionAliases: {body}")
        add, remove = set(), set()
        for entry in body["versionAliases"]:
            alias = entry.removeprefix("-")
            if not ALIAS.fullmatch(alias):
                raise _HttpError(400, f"version alias {entry!r} is invalid")
            (remove if entry.startswith("-") else add).add(alias)
        both = add & remove  # "the 2 operations will be cancelled out"
        add, remove = add - both, remove - both
        if DEFAULT_ALIAS in remove:
            raise _HttpError(
                400,
                "the default alias cannot be removed: one version must carry it",
                "FAILED_PRECONDITION",
            )
        for alias in remove:
            if model.aliases.get(alias) == number:
                del model.aliases[alias]
        for alias in add:
            model.aliases[alias] = number  # moved off its previous holder
        model.versions[number]["versionUpdateTime"] = self._now()
        return self._version(model, number)

    def _list(self, model: _Model, query: dict[str, str]) -> dict[str, Any]:
        try:
            size = int(query.get("pageSize") or DEFAULT_PAGE_SIZE)
        except ValueError:
            raise _HttpError(400, f"pageSize {query['pageSize']!r} is not a number") from None
        if size <= 0:
            size = DEFAULT_PAGE_SIZE
        offset = 0
        if query.get("pageToken"):
            try:
                token = json.loads(base64.urlsafe_b64decode(query["pageToken"]))
                offset, made_for = int(token["offset"]), token["model"]
            except (ValueError, KeyError, TypeError):
                raise _HttpError(400, "invalid page token") from None
            if made_for != model.model_id:
                raise _HttpError(400, "the page token belongs to another query")
        numbers = sorted(model.versions, reverse=True)  # no documented order: newest first
        answer: dict[str, Any] = {
            "models": [
                self._version(model, n, listed=True) for n in numbers[offset : offset + size]
            ]
        }
        if offset + size < len(numbers):
            token = json.dumps({"offset": offset + size, "model": model.model_id})
            answer["nextPageToken"] = base64.urlsafe_b64encode(token.encode()).decode()
        return answer


def _numeric_enums(answer: dict[str, Any]) -> dict[str, Any]:
    """What ``$alt=json;enum-encoding=int`` asks for: every enum as its number."""

    def model(data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        if "supportedDeploymentResourcesTypes" in data:
            data["supportedDeploymentResourcesTypes"] = [
                DEPLOYMENT_RESOURCES_TYPES[t] for t in data["supportedDeploymentResourcesTypes"]
            ]
        return data

    if "models" in answer:
        return {**answer, "models": [model(m) for m in answer["models"]]}
    if "versionId" in answer:
        return model(answer)
    return answer


class _Handler(BaseHTTPRequestHandler):
    fake: FakeVertexModels

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
