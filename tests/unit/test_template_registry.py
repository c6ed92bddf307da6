import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from ml_platform.resources.templates import TemplateError
from ml_platform.resources.templates.local import LocalTemplateRegistry


def template(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"{hashlib.md5(text.encode()).hexdigest()}.yaml"
    path.write_text(text)
    return path


def test_tags_resolve_to_content_versions(tmp_path: Path):
    registry = LocalTemplateRegistry(tmp_path / "registry")
    first = registry.upload("flight-delay-training", template(tmp_path, "a: 1\n"), ["v1", "latest"])
    assert first.version == "sha256:" + hashlib.sha256(b"a: 1\n").hexdigest()
    assert registry.resolve("flight-delay-training", "latest") == first
    assert registry.fetch(first) == b"a: 1\n"
    # Uploading the same content again is the same version; a new one moves only its tags.
    again = registry.upload("flight-delay-training", template(tmp_path, "a: 1\n"), ["v1"])
    assert again.version == first.version
    second = registry.upload("flight-delay-training", template(tmp_path, "a: 2\n"), ["latest"])
    assert registry.resolve("flight-delay-training", "latest").version == second.version
    assert registry.resolve("flight-delay-training", "v1").version == first.version
    assert registry.resolve("flight-delay-training", first.version).version == first.version
    assert {v.version: v.tags for v in registry.list_versions("flight-delay-training")} == {
        first.version: ("v1",),
        second.version: ("latest",),
    }


def test_a_changed_file_no_longer_matches_its_version(tmp_path: Path):
    registry = LocalTemplateRegistry(tmp_path / "registry")
    version = registry.upload("p", template(tmp_path, "a: 1\n"), ["latest"])
    Path(version.uri).write_text("a: 666\n")
    with pytest.raises(TemplateError, match="does not match"):
        registry.fetch(version)


@pytest.mark.parametrize("tag", ["", "sha256:abc", "has space", "-dash", "v1\n"])
def test_invalid_tags_are_refused(tmp_path: Path, tag: str):
    registry = LocalTemplateRegistry(tmp_path / "registry")
    with pytest.raises(TemplateError, match="invalid tag"):
        registry.upload("p", template(tmp_path, "a: 1\n"), [tag])


def test_unknown_package_tag_and_version(tmp_path: Path):
    registry = LocalTemplateRegistry(tmp_path / "registry")
    with pytest.raises(TemplateError, match=r"template 'p' has no tag 'latest' .*tags: none"):
        registry.resolve("p", "latest")
    registry.upload("p", template(tmp_path, "a: 1\n"), ["latest"])
    with pytest.raises(TemplateError, match="has no version sha256:0000"):
        registry.resolve("p", "sha256:0000")


def _upload(root: str, source: str) -> str:
    return LocalTemplateRegistry(root).upload("pipe", Path(source), ["latest"]).version


def test_concurrent_uploads_of_the_same_template_all_succeed(tmp_path: Path):
    # The CLI and a Dagster run publishing together: each upload writes the version file.
    source = tmp_path / "big.yaml"
    source.write_bytes(os.urandom(4 << 20))  # a large file widens the window
    expected = f"sha256:{hashlib.sha256(source.read_bytes()).hexdigest()}"
    for attempt in range(5):
        root = tmp_path / f"registry-{attempt}"
        with ProcessPoolExecutor(max_workers=3) as pool:
            versions = list(pool.map(_upload, [str(root)] * 3, [str(source)] * 3))
        assert versions == [expected] * 3
        registry = LocalTemplateRegistry(root)
        assert registry.fetch(registry.resolve("pipe", "latest")) == source.read_bytes()
