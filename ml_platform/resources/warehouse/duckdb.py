"""The warehouse in a DuckDB file (the local deployment), through the ``duckdb`` package.

DuckDB is imported inside the methods: the code location reaches this module, and pipeline
components reopen it from its ``uri`` in processes of their own.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml_platform.resources.retries import Backoff, RetryDeadlineError, call
from ml_platform.resources.warehouse import (
    Warehouse,
    WarehouseError,
    check_identifier,
    check_partition,
)

if TYPE_CHECKING:
    import duckdb
    import pandas as pd
    import pyarrow as pa


class DuckDBWarehouse(Warehouse):
    """A DuckDB file. DuckDB lets one process write at a time: our processes (the Dagster
    steps, the pipeline components, dbt through the dbt assets) take turns, each waiting up
    to ``lock_timeout`` seconds for its turn."""

    def __init__(self, path: str | Path, *, lock_timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout

    @property
    def uri(self) -> str:
        return f"duckdb://{self.path.resolve()}"

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f"{self.path.name}.lock")

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            raise WarehouseError(f"the warehouse {self.path} does not exist yet (run the ingest)")
        with self._turn(exclusive=not read_only, purpose="reading" if read_only else "writing"):
            connection = self._open(read_only=read_only)
            try:
                yield connection
            finally:
                connection.close()

    def ensure_datasets(self, datasets: Iterable[str]) -> None:
        check_identifier(*datasets)
        with self.connect() as connection:
            for dataset in datasets:
                connection.execute(f"CREATE SCHEMA IF NOT EXISTS {dataset}")

    @contextmanager
    def writer_turn(self, purpose: str) -> Iterator[None]:
        # dbt-duckdb opens the file itself and fails at once if another process holds it:
        # the turn is held for the whole dbt command, so no writer of ours starts meanwhile.
        with self._turn(exclusive=True, purpose=purpose):
            self._open(read_only=False).close()  # nor is one outside the turns still at it
            yield

    def _open(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        import duckdb

        def held_by_another_process(error: Exception) -> bool:
            return isinstance(error, duckdb.IOException) and "lock" in str(error).lower()

        try:
            # A process outside the turns (a person's dbt or duckdb shell) may still hold the
            # file: DuckDB's own lock says so; wait for it too.
            return call(
                lambda: duckdb.connect(str(self.path), read_only=read_only),
                transient=held_by_another_process,
                backoff=Backoff(initial=0.05, maximum=1.0, deadline=self.lock_timeout),
            )
        except (duckdb.IOException, RetryDeadlineError) as error:
            cause = error.cause if isinstance(error, RetryDeadlineError) else error
            raise WarehouseError(f"cannot open {self.path}: {cause}") from error

    @contextmanager
    def _turn(self, *, exclusive: bool, purpose: str) -> Iterator[None]:
        """This process's turn at the file, waited for up to ``lock_timeout``: shared for
        readers, exclusive for writers (DuckDB lets one process write, or any number read).

        An advisory lock beside the file, held for as long as the file is used: DuckDB's
        own lock is taken only once the file is open, which leaves a writer that opens it
        itself (dbt) a gap as long as its start-up. The kernel releases it when the process
        ends, however it ends. An exclusive holder writes who it is into the lock file, so a
        writer that waits too long can say who holds the warehouse.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                call(
                    lambda: fcntl.flock(
                        fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
                    ),
                    transient=lambda error: isinstance(error, BlockingIOError),
                    backoff=Backoff(initial=0.05, maximum=1.0, deadline=self.lock_timeout),
                )
            except (BlockingIOError, RetryDeadlineError) as error:
                holder = self.lock_path.read_text().strip() or "processes reading it"
                raise WarehouseError(
                    f"cannot open {self.path}: {holder} has held it for over "
                    f"{self.lock_timeout:g} s (lock {self.lock_path})"
                ) from error
            if exclusive:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} ({purpose})".encode(), 0)
            try:
                yield
            finally:
                if exclusive:
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect() as connection:
            connection.execute("BEGIN TRANSACTION")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def replace_table(self, dataset: str, table: str, data: pa.Table) -> int:
        check_identifier(dataset, table)
        with self._transaction() as connection:
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS {dataset}")
            connection.register("incoming", data)
            connection.execute(
                f"CREATE OR REPLACE TABLE {dataset}.{table} AS SELECT * FROM incoming"
            )
            connection.unregister("incoming")
        return data.num_rows

    def replace_partition(
        self, dataset: str, table: str, column: str, value: date, data: pa.Table
    ) -> int:
        check_identifier(dataset, table, column)
        check_partition(data, f"{dataset}.{table}", column, value)
        with self._transaction() as connection:
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS {dataset}")
            connection.register("incoming", data)
            connection.execute(
                f"CREATE TABLE IF NOT EXISTS {dataset}.{table} AS SELECT * FROM incoming LIMIT 0"
            )
            connection.execute(f"DELETE FROM {dataset}.{table} WHERE {column} = ?", [value])
            try:
                connection.execute(f"INSERT INTO {dataset}.{table} BY NAME SELECT * FROM incoming")
            except Exception as error:
                raise WarehouseError(
                    f"rows do not fit {dataset}.{table} (columns {data.column_names}): {error}"
                ) from error
            connection.unregister("incoming")
        return data.num_rows

    def replace_partitions(
        self, dataset: str, table: str, column: str, parts: Mapping[date, pa.Table]
    ) -> dict[date, int]:
        """All the values in one transaction: a backfill of 92 days takes one turn as a
        writer, not 92."""
        import pyarrow as pa

        check_identifier(dataset, table, column)
        if not parts:
            return {}
        for value, data in parts.items():
            check_partition(data, f"{dataset}.{table}", column, value)
        data = pa.concat_tables(parts.values())
        with self._transaction() as connection:
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS {dataset}")
            connection.register("incoming", data)
            connection.execute(
                f"CREATE TABLE IF NOT EXISTS {dataset}.{table} AS SELECT * FROM incoming LIMIT 0"
            )
            marks = ", ".join("?" for _ in parts)
            connection.execute(
                f"DELETE FROM {dataset}.{table} WHERE {column} IN ({marks})", list(parts)
            )
            try:
                connection.execute(f"INSERT INTO {dataset}.{table} BY NAME SELECT * FROM incoming")
            except Exception as error:
                raise WarehouseError(
                    f"rows do not fit {dataset}.{table} (columns {data.column_names}): {error}"
                ) from error
            connection.unregister("incoming")
        return {value: part.num_rows for value, part in parts.items()}

    def read_table(
        self,
        dataset: str,
        table: str,
        *,
        date_column: str | None = None,
        start: date | None = None,
        end: date | None = None,
    ) -> pd.DataFrame:
        check_identifier(dataset, table)
        conditions, parameters = [], []
        if date_column is not None:
            check_identifier(date_column)
            if start is not None:
                conditions.append(f"{date_column} >= ?")
                parameters.append(start)
            if end is not None:
                conditions.append(f"{date_column} < ?")
                parameters.append(end)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        with self.connect(read_only=True) as connection:
            if not self._exists(connection, dataset, table):
                raise WarehouseError(f"table {dataset}.{table} does not exist in {self.path}")
            return connection.execute(
                f"SELECT * FROM {dataset}.{table}{where}", parameters
            ).fetch_df()

    def row_count(
        self, dataset: str, table: str, *, column: str | None = None, value: Any = None
    ) -> int:
        check_identifier(dataset, table)
        if not self.path.exists():
            return 0
        with self.connect(read_only=True) as connection:
            if not self._exists(connection, dataset, table):
                return 0
            if column is None:
                return connection.execute(f"SELECT count(*) FROM {dataset}.{table}").fetchone()[0]
            check_identifier(column)
            return connection.execute(
                f"SELECT count(*) FROM {dataset}.{table} WHERE {column} = ?", [value]
            ).fetchone()[0]

    def table_exists(self, dataset: str, table: str) -> bool:
        if not self.path.exists():
            return False
        with self.connect(read_only=True) as connection:
            return self._exists(connection, dataset, table)

    def drop_dataset(self, dataset: str) -> bool:
        check_identifier(dataset)
        if not self.path.exists():
            return False
        with self._transaction() as connection:
            found = connection.execute(
                "SELECT count(*) FROM information_schema.schemata WHERE schema_name = ?",
                [dataset],
            ).fetchone()[0]
            connection.execute(f"DROP SCHEMA IF EXISTS {dataset} CASCADE")
        return found > 0

    @staticmethod
    def _exists(connection: duckdb.DuckDBPyConnection, dataset: str, table: str) -> bool:
        found = connection.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = ? AND table_name = ?",
            [dataset, table],
        ).fetchone()[0]
        return found > 0
