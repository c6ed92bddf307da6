"""The templates contract: compiled pipeline templates, kept under tags that resolve to
immutable sha256 versions. Backends: ``local.py`` (a folder) and ``artifact_registry.py``
(a KFP-format Artifact Registry repository).

A job is always submitted by version, never by tag: a tag can move between resolving and
running, and Vertex's service agent may not be allowed to read tags at all.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PACKAGE = re.compile(r"^[a-z][a-z0-9-]{0,127}$")
_VERSION = re.compile(r"^sha256:[0-9a-f]{64}$")


class TemplateError(LookupError):
    """A template, tag or version is unknown or cannot be stored."""


@dataclass(frozen=True)
class TemplateVersion:
    package: str
    version: str  # "sha256:<hex>"
    uri: str  # what a runner submits: a local file, or an Artifact Registry URL
    tags: tuple[str, ...] = ()


def template_version_of(content: bytes) -> str:
    return f"sha256:{hashlib.sha256(content).hexdigest()}"


class TemplateRegistry(ABC):
    @abstractmethod
    def upload(self, package: str, template: Path, tags: Sequence[str]) -> TemplateVersion:
        """Store a compiled template and point ``tags`` at its version."""

    @abstractmethod
    def resolve(self, package: str, tag: str) -> TemplateVersion:
        """The version a tag points to now; an unknown tag is a ``TemplateError`` naming both."""

    @abstractmethod
    def list_versions(self, package: str) -> list[TemplateVersion]: ...

    @abstractmethod
    def fetch(self, version: TemplateVersion) -> bytes:
        """The compiled YAML of one version."""


def is_tag_or_version(text: str) -> bool:
    """A tag (``latest``, ``v1.2.0``, ``sha-1f2e3d``) or an explicit ``sha256:`` version."""
    return bool(_TAG.fullmatch(text) or _VERSION.fullmatch(text))


def check_tags(package: str, tags: Sequence[str]) -> None:
    if not _PACKAGE.fullmatch(package):
        raise TemplateError(f"invalid template package name {package!r}")
    for tag in tags:
        if tag.startswith("sha256:") or not _TAG.fullmatch(tag):
            raise TemplateError(f"invalid tag {tag!r} for template {package}")
