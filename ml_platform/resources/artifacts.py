"""Pipeline artifacts (models, metrics, plots): a local folder, or a GCS bucket.

Pipelines write their artifacts under the deployment's pipeline root; Dagster only reads
a few of them back (the evaluation plot for the model's metadata) and deletes a pull
request's prefix when the pull request closes.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from pathlib import Path


class ArtifactError(LookupError):
    """An artifact that cannot be read, or a prefix outside this store."""


class ArtifactStore(ABC):
    @property
    @abstractmethod
    def root(self) -> str:
        """The pipeline root: where this deployment's pipeline jobs write their artifacts."""

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every artifact under ``prefix`` (inside the root); returns how many."""


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root: str | Path) -> None:
        self._root = Path(root)

    @property
    def root(self) -> str:
        return str(self._root)

    def read_bytes(self, uri: str) -> bytes:
        try:
            return Path(uri).read_bytes()
        except OSError as error:
            raise ArtifactError(f"cannot read artifact {uri}: {error}") from error

    def delete_prefix(self, prefix: str) -> int:
        target = (self._root / prefix).resolve()
        if not target.is_relative_to(self._root.resolve()) or target == self._root.resolve():
            raise ArtifactError(f"refusing to delete {prefix!r}: not a prefix inside {self.root}")
        if not target.exists():
            return 0
        count = sum(1 for path in target.rglob("*") if path.is_file())
        shutil.rmtree(target)
        return count


def split_gcs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/name`` as (bucket, name); the name may be empty (a bucket's root)."""
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    if not uri.startswith("gs://") or not bucket:
        raise ArtifactError(f"not a GCS uri (gs://BUCKET/...): {uri!r}")
    return bucket, name


class GcsArtifactStore(ArtifactStore):
    """A prefix of a GCS bucket, through the official ``google-cloud-storage`` client.

    The client honours ``STORAGE_EMULATOR_HOST``, which is how the tests point it at a
    local fake-gcs-server.
    """

    def __init__(
        self, root: str, *, project: str | None = None, credentials=None, timeout: float = 60.0
    ) -> None:
        self._root = root.rstrip("/")
        split_gcs_uri(self._root)  # validates
        self.project = project
        self.credentials = credentials  # None: Application Default Credentials
        self.timeout = timeout
        self._client = None

    @property
    def root(self) -> str:
        return self._root

    def client(self):
        if self._client is None:
            from google.cloud import storage

            self._client = storage.Client(project=self.project, credentials=self.credentials)
        return self._client

    def read_bytes(self, uri: str) -> bytes:
        from google.api_core import exceptions

        bucket, name = split_gcs_uri(uri)
        if not name:
            raise ArtifactError(f"cannot read artifact {uri}: it names no object")
        try:
            blob = self.client().bucket(bucket).blob(name)
            return blob.download_as_bytes(timeout=self.timeout)
        except exceptions.GoogleAPICallError as error:
            raise ArtifactError(f"cannot read artifact {uri}: {error}") from error

    def delete_prefix(self, prefix: str) -> int:
        from google.api_core import exceptions

        prefix = prefix.strip("/")
        if not prefix or ".." in prefix.split("/"):
            raise ArtifactError(f"refusing to delete {prefix!r}: not a prefix inside {self.root}")
        bucket_name, root_name = split_gcs_uri(self.root)
        full = f"{root_name}/{prefix}/" if root_name else f"{prefix}/"
        bucket = self.client().bucket(bucket_name)
        deleted = 0
        gone: list[object] = []  # deleted meanwhile (a second cleanup, a lifecycle rule)
        try:
            # list_blobs pages through everything under the prefix; delete in batches.
            pages = self.client().list_blobs(bucket, prefix=full, timeout=self.timeout).pages
            for page in pages:
                blobs = list(page)
                if blobs:
                    bucket.delete_blobs(blobs, on_error=gone.append, timeout=self.timeout)
                    deleted += len(blobs)
        except exceptions.GoogleAPICallError as error:
            raise ArtifactError(
                f"cannot delete gs://{bucket_name}/{full} ({deleted} objects deleted): {error}"
            ) from error
        return deleted - len(gone)
