"""Templates in a local folder: a file per version, tags in a JSON file."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ml_platform.resources.local_files import write_atomically
from ml_platform.resources.templates import (
    TemplateError,
    TemplateRegistry,
    TemplateVersion,
    check_tags,
    template_version_of,
)


class LocalTemplateRegistry(TemplateRegistry):
    """``<root>/<package>/versions/<sha256>.yaml`` plus ``<root>/<package>/tags.json``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _package_dir(self, package: str) -> Path:
        return self.root / package

    @contextmanager
    def _locked_tags(self, package: str) -> Iterator[dict[str, str]]:
        # Two publishers can race (CLI and a Dagster run): the tags file is read, changed
        # and replaced under an exclusive lock, and written atomically.
        directory = self._package_dir(package)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tags = self._read_tags(package)
            yield tags
            write_atomically(
                directory / "tags.json", json.dumps(tags, indent=2, sort_keys=True).encode()
            )

    def _read_tags(self, package: str) -> dict[str, str]:
        path = self._package_dir(package) / "tags.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _version_path(self, package: str, version: str) -> Path:
        return self._package_dir(package) / "versions" / f"{version.removeprefix('sha256:')}.yaml"

    def _version(self, package: str, version: str, tags: dict[str, str]) -> TemplateVersion:
        return TemplateVersion(
            package=package,
            version=version,
            uri=str(self._version_path(package, version)),
            tags=tuple(sorted(tag for tag, v in tags.items() if v == version)),
        )

    def upload(self, package: str, template: Path, tags: Sequence[str]) -> TemplateVersion:
        check_tags(package, tags)
        content = Path(template).read_bytes()
        version = template_version_of(content)
        path = self._version_path(package, version)
        # Under the package's lock: two uploads of the same template (the CLI and a run)
        # would otherwise share the scratch file, and one could publish the other's half.
        with self._locked_tags(package) as current:
            if not path.exists():
                write_atomically(path, content)
            current.update(dict.fromkeys(tags, version))
            return self._version(package, version, current)

    def resolve(self, package: str, tag: str) -> TemplateVersion:
        tags = self._read_tags(package)
        if tag.startswith("sha256:"):
            version = tag
        elif tag in tags:
            version = tags[tag]
        else:
            known = ", ".join(sorted(tags)) or "none"
            raise TemplateError(
                f"template {package!r} has no tag {tag!r} in {self.root} (tags: {known})"
            )
        if not self._version_path(package, version).exists():
            raise TemplateError(f"template {package!r} has no version {version} in {self.root}")
        return self._version(package, version, tags)

    def list_versions(self, package: str) -> list[TemplateVersion]:
        tags = self._read_tags(package)
        versions = self._package_dir(package) / "versions"
        paths = sorted(versions.glob("*.yaml"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [self._version(package, f"sha256:{p.stem}", tags) for p in paths]

    def fetch(self, version: TemplateVersion) -> bytes:
        content = Path(version.uri).read_bytes()
        if template_version_of(content) != version.version:
            raise TemplateError(f"template file {version.uri} does not match {version.version}")
        return content
