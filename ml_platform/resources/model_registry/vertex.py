"""The Vertex AI Model Registry backend: the GAPIC ``ModelServiceClient``, nothing higher.

One Vertex model per deployment (``flight-delay`` in prod, ``flight-delay-pr-7`` for pull
request 7: ``model_id_for``), its versions ours. The contract maps onto the API as:

- ``register``: ``upload_model`` into ``projects/P/locations/L``, with ``model_id`` for the
  first version and ``parent_model`` for the later ones (whether the model exists is asked
  with ``get_model``; a model another process created meanwhile is ALREADY_EXISTS, and the
  upload is made again as a new version). The long-running operation is waited for, and
  the version read back from its response (``model``, ``model_version_id``).
- ``get``: ``get_model`` on ``MODEL@VERSION`` or ``MODEL@ALIAS``; NOT_FOUND is None.
- ``move_alias``: ``merge_version_aliases`` on ``MODEL@VERSION``. Vertex moves an alias
  another version holds in the same call (the model-alias guide: "If you apply an existing
  alias that is used in another model version, the alias is removed from that version"),
  so there is no separate ``-alias`` removal, and no moment without a champion.
- ``list_versions``: ``list_model_versions`` through every page, ordered here by version id
  (versions are numbered in upload order; the reference documents no default order).

Where a version's facts live: the Model resource has no field for metrics or provenance
that takes them as they are. ``labels`` are lowercase, at most 64 characters and lose
anything else; ``metadata`` is "Immutable" and described by a ``metadata_schema_uri``
schema file, which custom models do not have. ``version_description`` is a free string
of the version: it holds them as JSON (``format`` names the layout), floats written with
Python's shortest round-trip repr, so they come back exactly. ``artifact_uri`` is, as the
reference defines it, "the path to the directory containing the Model artifact": the
model file's directory; the file itself is in the description. Labels carry the same
provenance, sanitised, for filtering in the console.

Vertex gives the first version of a model the alias ``default`` (what a bare model name
resolves to) and requires one version to hold it at all times. It is Vertex's, not one of
ours: it is left out of ``ModelVersion.aliases`` and refused as an alias to set.

Every call retries transient errors (``retries.is_transient``: 429 and 5xx, a dropped
connection) with exponential backoff to a bounded deadline, and has its own request
timeout; an upload is not retried after a timeout (see ``_upload_retry``). Every other
Google error becomes one ``ModelRegistryError`` line naming the model, the action and the
endpoint.

Google libraries are imported inside the methods that use them: this module is reached
when the code location is imported, and ``google.cloud.aiplatform_v1`` alone takes seconds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC
from functools import cached_property
from typing import TYPE_CHECKING, Any

from ml_platform.resources.google_api import api_errors, gapic_client
from ml_platform.resources.model_registry import (
    MODEL_NAME,
    ModelRegistry,
    ModelRegistryError,
    ModelVersion,
    check_alias,
)
from ml_platform.resources.retries import Backoff, is_transient
from ml_platform.settings import Deployment, sanitize_label_key, sanitize_label_value

if TYPE_CHECKING:
    from ml_platform.settings import Settings

# UploadModelRequest.model_id: "up to 63 characters, and valid characters are [a-z0-9_-].
# The first character cannot be a number or hyphen."
_MODEL_ID = re.compile(r"^[a-z_][a-z0-9_-]{0,62}$")
# Model.labels: at most 64, of lowercase letters, digits, '_' and '-' (the settings'
# sanitisers cut to 63 characters, the rule Vertex's other resources share).
_MAX_LABELS = 64
DEFAULT_ALIAS = "default"  # Vertex's own; see the module docstring
DESCRIPTION_FORMAT = "ml-platform/model-version/1"
_DISPLAY_NAME_MAX = 128


def model_id_for(settings: Settings) -> str:
    """The deployment's Vertex model: ``flight-delay`` in prod, ``flight-delay-pr-N`` for
    pull request N (``flight-delay-local`` for a local deployment pointed at Vertex)."""
    if settings.deployment is Deployment.PROD:
        return MODEL_NAME
    # storage_prefix: "branch/pr-7" for a branch deployment, "local" for the local one.
    return f"{MODEL_NAME}-{settings.storage_prefix.rsplit('/', 1)[-1]}"


def _describe(provenance: Mapping[str, Any]) -> str:
    return json.dumps(
        {"format": DESCRIPTION_FORMAT, **provenance}, sort_keys=True, separators=(",", ":")
    )


def _provenance(description: str) -> dict[str, Any] | None:
    try:
        data = json.loads(description)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("format") != DESCRIPTION_FORMAT:
        return None
    return data


class VertexModelRegistry(ModelRegistry):
    """Versions of the deployment's model (``model_id``) in Vertex AI Model Registry."""

    def __init__(
        self,
        *,
        project: str,
        region: str,
        model_id: str,
        serving_image: str,
        api_endpoint: str | None = None,
        credentials: Any = None,
        transport: str = "rest",
        labels: Mapping[str, str] | None = None,
        request_timeout: float = 60.0,
        retry_initial: float = 1.0,
        retry_maximum: float = 30.0,
        retry_deadline: float = 180.0,
        upload_timeout: float = 900.0,
        poll_initial: float = 1.0,
        poll_maximum: float = 10.0,
        page_size: int = 100,
    ) -> None:
        if not _MODEL_ID.fullmatch(model_id):
            raise ValueError(
                f"Vertex model id {model_id!r}: up to 63 characters of [a-z0-9_-], not "
                "starting with a digit or '-'"
            )
        if not serving_image:
            raise ValueError("Vertex needs a serving image to register a custom model")
        self.project = project
        self.region = region
        self.model_id = model_id
        # Vertex requires a serving container for a custom model upload. We never deploy
        # to an endpoint (batch scoring is our own pipeline), so it is never run: the
        # pipelines' component image is named because it exists and can load the model.
        self.serving_image = serving_image
        self.api_endpoint = api_endpoint or f"{region}-aiplatform.googleapis.com"
        self.credentials = credentials
        # REST by default: the transport the wire tests exercise; a few calls per training
        # run gain nothing from gRPC's long-lived channels.
        self.transport = transport
        self.labels = dict(labels or {})
        self.request_timeout = request_timeout
        self.retry_initial = retry_initial
        self.retry_maximum = retry_maximum
        self.retry_deadline = retry_deadline
        self.upload_timeout = upload_timeout
        self.poll_initial = poll_initial
        self.poll_maximum = poll_maximum
        self.page_size = page_size

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> VertexModelRegistry:
        if not settings.gcp_project:
            raise ValueError("the Vertex model registry needs ML_PLATFORM_GCP_PROJECT")
        arguments: dict[str, Any] = {
            "project": settings.gcp_project,
            "region": settings.gcp_region,
            "model_id": model_id_for(settings),
            "serving_image": settings.component_image,
            "api_endpoint": settings.vertex_api_endpoint,
            "labels": settings.labels,
        }
        return cls(**{**arguments, **overrides})

    # -- names -----------------------------------------------------------------------------

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    @property
    def model_name(self) -> str:
        return f"{self.parent}/models/{self.model_id}"

    # -- the client and its error handling -------------------------------------------------

    @cached_property
    def _client(self) -> Any:
        from google.cloud.aiplatform_v1 import ModelServiceClient

        return gapic_client(
            ModelServiceClient,
            endpoint=self.api_endpoint,
            credentials=self.credentials,
            transport=self.transport,
        )

    def _backoff(self) -> Backoff:
        return Backoff(
            initial=self.retry_initial, maximum=self.retry_maximum, deadline=self.retry_deadline
        )

    @cached_property
    def _retry(self) -> Any:
        return self._backoff().retry(is_transient)

    @cached_property
    def _upload_retry(self) -> Any:
        # An upload is not idempotent. A retry after an error answer (429, 5xx) can at worst
        # register the same artifact twice, the aliases ending on the newer copy: no worse
        # than failing, whose step retry registers it again. After a timeout, the upload
        # may still be under way: that one is not repeated (retries.is_transient).
        return self._backoff().retry(lambda error: is_transient(error, timeouts=False))

    @cached_property
    def _polling(self) -> Any:
        # How often the upload's operation is looked at (its own errors are retried with
        # _retry); the library's default starts at 1 s and grows to 20 s.
        from google.api_core.future.polling import POLLING_PREDICATE
        from google.api_core.retry import Retry

        return Retry(
            predicate=POLLING_PREDICATE,
            initial=self.poll_initial,
            maximum=self.poll_maximum,
            multiplier=1.5,
            timeout=self.upload_timeout,
        )

    def _call(self, method: Callable[..., Any], *, retry: Any = None, **arguments: Any) -> Any:
        return method(**arguments, retry=retry or self._retry, timeout=self.request_timeout)

    def _error(self, action: str, error: BaseException) -> ModelRegistryError:
        from google.api_core import exceptions

        where = f"model {self.model_id} in {self.parent}, endpoint {self.api_endpoint}"
        if isinstance(error, exceptions.RetryError):
            detail = (
                f"gave up retrying transient errors ({error.message}); last error: {error.cause}"
            )
        else:
            detail = str(error)
        # One line: an API error's text may carry the response's own line breaks.
        return ModelRegistryError(
            " ".join(f"Vertex AI could not {action} ({where}): {detail}".split())
        )

    @staticmethod
    def _api_errors() -> tuple[type[BaseException], ...]:
        return api_errors()

    def _get_model(self, name: str, action: str) -> Any | None:
        from google.api_core import exceptions

        try:
            return self._call(self._client.get_model, name=name)
        except exceptions.NotFound:
            return None
        except self._api_errors() as error:
            raise self._error(action, error) from error

    @staticmethod
    def _check_alias(alias: str) -> None:
        check_alias(alias)
        if alias == DEFAULT_ALIAS:
            raise ModelRegistryError(
                f"alias {DEFAULT_ALIAS!r} is Vertex AI's own (the version a bare model name "
                "resolves to); use another name"
            )

    # -- the contract ----------------------------------------------------------------------

    def register(
        self,
        artifact_uri: str,
        *,
        metrics: Mapping[str, float],
        cutoff: str,
        data_fingerprint: str,
        template_version: str,
        dagster_run: str,
        aliases: tuple[str, ...] = (),
    ) -> ModelVersion:
        from google.api_core import exceptions
        from google.cloud.aiplatform_v1 import types

        for alias in aliases:
            self._check_alias(alias)
        directory, _, file_name = artifact_uri.rpartition("/")
        if not artifact_uri.startswith("gs://") or not file_name or directory == "gs:/":
            raise ModelRegistryError(
                f"model {self.model_id}: Vertex AI registers a model file in Cloud Storage "
                f"(gs://BUCKET/PATH/FILE), got {artifact_uri!r}"
            )
        provenance = {
            "artifact_uri": artifact_uri,
            "metrics": {name: float(value) for name, value in metrics.items()},
            "cutoff": cutoff,
            "data_fingerprint": data_fingerprint,
            "template_version": template_version,
            "dagster_run": dagster_run,
        }
        model = types.Model(
            display_name=self.model_id[:_DISPLAY_NAME_MAX],
            version_description=_describe(provenance),
            version_aliases=sorted(set(aliases)),
            labels=self._version_labels(provenance),
            artifact_uri=directory,
            container_spec=types.ModelContainerSpec(image_uri=self.serving_image),
        )
        first = self._get_model(self.model_name, "look up the model") is None
        try:
            try:
                response = self._upload(model, first=first)
            except exceptions.Conflict as error:
                # ALREADY_EXISTS (REST answers every 409 as Conflict; ABORTED is another
                # matter): another process created the model since we looked.
                aborted = isinstance(error, exceptions.Aborted) or _status(error) == "ABORTED"
                if not first or aborted:
                    raise
                response = self._upload(model, first=False)
        except TimeoutError as error:
            raise ModelRegistryError(
                f"Vertex AI did not finish registering a version of model {self.model_id} "
                f"within {self.upload_timeout:g} s (endpoint {self.api_endpoint}); the version "
                "may still appear: list the versions before registering it again"
            ) from error
        except self._api_errors() as error:
            raise self._error("register a version", error) from error
        version = response.model_version_id
        registered = self.get(version) if version else None
        if registered is None:
            raise ModelRegistryError(
                f"Vertex AI registered version {version!r} of model {self.model_id} "
                f"(endpoint {self.api_endpoint}) but does not return it"
            )
        return registered

    def _upload(self, model: Any, *, first: bool) -> Any:
        from google.cloud.aiplatform_v1 import types

        # The first version creates the model under our id; later ones name it as parent
        # (the reference: parent_model "Only specify this field when uploading a new
        # version").
        where = {"model_id": self.model_id} if first else {"parent_model": self.model_name}
        request = types.UploadModelRequest(parent=self.parent, model=model, **where)
        operation = self._call(self._client.upload_model, request=request, retry=self._upload_retry)
        # Polling errors are retried like any read; the wait is bounded by upload_timeout.
        return operation.result(
            timeout=self.upload_timeout, retry=self._retry, polling=self._polling
        )

    def get(self, version_or_alias: str) -> ModelVersion | None:
        if not version_or_alias.isdigit():
            try:
                check_alias(version_or_alias)
            except ModelRegistryError:
                return None  # no version can hold it, as in the local backend
        found = self._get_model(
            f"{self.model_name}@{version_or_alias}", f"get {version_or_alias!r}"
        )
        return None if found is None else self._to_version(found)

    def move_alias(self, alias: str, version: str) -> ModelVersion:
        from google.api_core import exceptions

        self._check_alias(alias)
        missing = ModelRegistryError(
            f"model {self.model_id} has no version {version!r} (in {self.parent}, endpoint "
            f"{self.api_endpoint})"
        )
        if not version.isdigit():
            raise missing  # the reference: a name "with a version id explicitly included"
        try:
            # One call: Vertex takes the alias from whichever version held it.
            moved = self._call(
                self._client.merge_version_aliases,
                name=f"{self.model_name}@{version}",
                version_aliases=[alias],
            )
        except exceptions.NotFound as error:
            raise missing from error
        except self._api_errors() as error:
            raise self._error(f"move alias {alias} to version {version}", error) from error
        return self._to_version(moved)

    def list_versions(self) -> list[ModelVersion]:
        from google.api_core import exceptions
        from google.cloud.aiplatform_v1 import types

        request = types.ListModelVersionsRequest(name=self.model_name, page_size=self.page_size)
        try:
            # The pager fetches each further page with the same retry and timeout.
            pager = self._call(self._client.list_model_versions, request=request)
            versions = [self._to_version(model) for model in pager]
        except exceptions.NotFound:
            return []  # no version registered yet
        except self._api_errors() as error:
            raise self._error("list the versions", error) from error
        return sorted(versions, key=lambda v: int(v.version))

    # -- the API's model as ours -----------------------------------------------------------

    def _version_labels(self, provenance: Mapping[str, Any]) -> dict[str, str]:
        labels = {sanitize_label_key(k): sanitize_label_value(v) for k, v in self.labels.items()}
        labels["model"] = sanitize_label_value(MODEL_NAME)
        for key in ("cutoff", "data_fingerprint", "template_version", "dagster_run"):
            if provenance[key]:
                labels[key] = sanitize_label_value(provenance[key])
        if len(labels) > _MAX_LABELS:
            raise ModelRegistryError(
                f"model {self.model_id}: {len(labels)} labels; Vertex allows {_MAX_LABELS}"
            )
        return labels

    def _to_version(self, model: Any) -> ModelVersion:
        pb = type(model).pb(model)
        created = (
            pb.version_create_time.ToDatetime(tzinfo=UTC)
            if pb.HasField("version_create_time")
            else None
        )
        aliases = tuple(sorted(a for a in pb.version_aliases if a != DEFAULT_ALIAS))
        facts = _provenance(pb.version_description)
        if facts is None:
            # A version uploaded by other means (the console, the SDK): what Vertex knows
            # of it, so that listing still works; it has no metrics to promote it on.
            facts = {"artifact_uri": pb.artifact_uri, "metrics": {}}
        return ModelVersion(
            version=pb.version_id,
            artifact_uri=facts.get("artifact_uri", ""),
            metrics={name: float(value) for name, value in facts.get("metrics", {}).items()},
            cutoff=facts.get("cutoff", ""),
            data_fingerprint=facts.get("data_fingerprint", ""),
            template_version=facts.get("template_version", ""),
            dagster_run=facts.get("dagster_run", ""),
            aliases=aliases,
            created=created,
            labels=dict(pb.labels),
        )


def _status(error: Any) -> str | None:
    """The ``error.status`` of a REST error body (e.g. "ALREADY_EXISTS"), if there is one."""
    response = getattr(error, "response", None)
    try:
        return response.json()["error"]["status"]
    except Exception:
        return None
