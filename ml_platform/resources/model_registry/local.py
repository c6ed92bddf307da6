"""The local model registry: versions and aliases in one SQLite file under the data folder,
safe for several processes (a version number is taken inside the insert's transaction)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from ml_platform.resources.local_files import SqliteFile
from ml_platform.resources.model_registry import (
    MODEL_NAME,
    ModelRegistry,
    ModelRegistryError,
    ModelVersion,
    check_alias,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_versions (
    version INTEGER PRIMARY KEY,
    artifact_uri TEXT NOT NULL,
    metrics TEXT NOT NULL,
    cutoff TEXT NOT NULL,
    data_fingerprint TEXT NOT NULL,
    template_version TEXT NOT NULL,
    dagster_run TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS model_aliases (
    alias TEXT PRIMARY KEY,
    version INTEGER NOT NULL REFERENCES model_versions (version)
);
"""


class LocalModelRegistry(ModelRegistry):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = SqliteFile(self.path, _SCHEMA, ModelRegistryError, "model registry")

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
        for alias in aliases:
            check_alias(alias)
        with self._file.connect() as db:
            db.execute("BEGIN IMMEDIATE")  # one writer at a time: versions never collide
            try:
                version = db.execute(
                    "INSERT INTO model_versions (artifact_uri, metrics, cutoff, data_fingerprint,"
                    " template_version, dagster_run, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        artifact_uri,
                        json.dumps({name: float(value) for name, value in metrics.items()}),
                        cutoff,
                        data_fingerprint,
                        template_version,
                        dagster_run,
                        datetime.now(UTC).isoformat(),
                    ],
                ).lastrowid
                for alias in aliases:
                    db.execute(
                        "INSERT OR REPLACE INTO model_aliases (alias, version) VALUES (?, ?)",
                        [alias, version],
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return self._version(db, str(version))

    def get(self, version_or_alias: str) -> ModelVersion | None:
        if not self.path.exists():  # nothing registered yet: a look creates no file
            return None
        with self._file.connect() as db:
            return self._version(db, version_or_alias)

    def move_alias(self, alias: str, version: str) -> ModelVersion:
        check_alias(alias)
        with self._file.connect() as db:
            if not version.isdigit() or self._version(db, version) is None:
                raise ModelRegistryError(f"model {MODEL_NAME} has no version {version!r}")
            db.execute(
                "INSERT OR REPLACE INTO model_aliases (alias, version) VALUES (?, ?)",
                [alias, int(version)],
            )
            return self._version(db, version)

    def list_versions(self) -> list[ModelVersion]:
        if not self.path.exists():
            return []
        with self._file.connect() as db:
            rows = db.execute("SELECT * FROM model_versions ORDER BY version").fetchall()
            return [self._from_row(db, row) for row in rows]

    def _version(self, db: sqlite3.Connection, version_or_alias: str) -> ModelVersion | None:
        if version_or_alias.isdigit():
            where, key = "version = ?", int(version_or_alias)
        else:
            where = "version = (SELECT version FROM model_aliases WHERE alias = ?)"
            key = version_or_alias
        row = db.execute(f"SELECT * FROM model_versions WHERE {where}", [key]).fetchone()
        return None if row is None else self._from_row(db, row)

    @staticmethod
    def _from_row(db: sqlite3.Connection, row: sqlite3.Row) -> ModelVersion:
        aliases = db.execute(
            "SELECT alias FROM model_aliases WHERE version = ? ORDER BY alias", [row["version"]]
        ).fetchall()
        return ModelVersion(
            version=str(row["version"]),
            artifact_uri=row["artifact_uri"],
            metrics=json.loads(row["metrics"]),
            cutoff=row["cutoff"],
            data_fingerprint=row["data_fingerprint"],
            template_version=row["template_version"],
            dagster_run=row["dagster_run"],
            aliases=tuple(alias for (alias,) in aliases),
            created=datetime.fromisoformat(row["created"]),
        )
