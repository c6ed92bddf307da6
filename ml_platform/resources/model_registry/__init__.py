"""The model registry contract: versions of one model (``flight-delay``), each with its
artifact, metrics and provenance, and aliases that name one version each (``champion``,
``previous-champion``). Backends: ``local.py`` (SQLite under the data folder) and
``vertex.py`` (Vertex AI Model Registry).

Who holds ``champion`` decides what predictions score with; moving it is the one way to
promote or roll back a model (``promote`` below keeps ``previous-champion`` for rollback).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

MODEL_NAME = "flight-delay"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
# Vertex AI's rule for a version alias ([a-z][a-zA-Z0-9-]{0,126}[a-z0-9]); a version number
# can never be one, so "3" is a version and "champion" an alias wherever one is expected.
_ALIAS = re.compile(r"^[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]$")


class ModelRegistryError(LookupError):
    """A version or alias that does not exist, or a registry that cannot be reached; the
    message names the model and what was asked."""


@dataclass(frozen=True)
class ModelVersion:
    version: str  # "1", "2", ...: the registry's own version id
    artifact_uri: str  # the model file a prediction job reads
    metrics: Mapping[str, float]  # the training job's evaluation (out-of-time and test split)
    cutoff: str  # ISO date: the model trained on flights before it
    data_fingerprint: str  # what the training rows hash to
    template_version: str  # the training pipeline template ("sha256:...")
    dagster_run: str  # the run that registered it ("" if none)
    aliases: tuple[str, ...] = ()
    created: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


def check_alias(alias: str) -> None:
    if not _ALIAS.fullmatch(alias):
        raise ModelRegistryError(
            f"invalid alias {alias!r} for model {MODEL_NAME} "
            "(a lowercase letter first, then letters, digits or '-')"
        )


class ModelRegistry(ABC):
    """Versions of ``MODEL_NAME`` in one deployment."""

    @abstractmethod
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
        """A new version (the first creates the model); ``aliases`` move to it at once."""

    @abstractmethod
    def get(self, version_or_alias: str) -> ModelVersion | None:
        """The version with that id ("3") or holding that alias ("champion"); None if none."""

    @abstractmethod
    def move_alias(self, alias: str, version: str) -> ModelVersion:
        """Point ``alias`` at ``version`` (taking it from whichever version held it); returns
        the version as it is now. An unknown version is a ``ModelRegistryError``."""

    @abstractmethod
    def list_versions(self) -> list[ModelVersion]:
        """Every version, oldest first."""


def promote(registry: ModelRegistry, version: str) -> tuple[ModelVersion, ModelVersion | None]:
    """Make ``version`` the champion, keeping the one it replaces as ``previous-champion``
    (what a rollback goes back to). Returns (new champion, old champion or None)."""
    old = registry.get(CHAMPION)
    if registry.get(version) is None:
        raise ModelRegistryError(f"model {MODEL_NAME} has no version {version!r}")
    if old is not None and old.version != version:
        registry.move_alias(PREVIOUS_CHAMPION, old.version)
    return registry.move_alias(CHAMPION, version), old
