"""The warehouse contract: what the platform needs from a warehouse, and the checks every
backend shares. Backends: ``duckdb.py`` (local) and ``bigquery.py`` (Google Cloud).

Assets talk to it through Dagster, and Kubeflow components reopen the same warehouse from
its ``uri`` (``backends.open_warehouse``: a component runs in another process, on Vertex AI
in another machine), so the contract and its backends import no Dagster and nothing heavy at
module top; the contract imports the standard library only.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from datetime import date
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WarehouseError(RuntimeError):
    """A warehouse operation failed; the message names the table and what was wrong."""


def check_identifier(*names: str) -> None:
    """Dataset, table and column names are interpolated into SQL, so only plain names pass."""
    for name in names:
        if not _IDENTIFIER.fullmatch(name):
            raise WarehouseError(f"not a plain SQL identifier: {name!r}")


class Warehouse(ABC):
    """What the platform needs from a warehouse, and nothing more."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """A string a pipeline component can reopen the warehouse from
        (``ml_platform.resources.backends.open_warehouse``)."""

    @abstractmethod
    def replace_table(self, dataset: str, table: str, data: pa.Table) -> int:
        """Atomically replace a whole table with ``data``; returns the row count."""

    @abstractmethod
    def replace_partition(
        self, dataset: str, table: str, column: str, value: date, data: pa.Table
    ) -> int:
        """Atomically replace the rows where ``column = value`` with ``data``.

        Every row of ``data`` must carry that value, so re-running a day never duplicates
        rows and never touches another day. Returns the number of rows written.
        """

    def replace_partitions(
        self, dataset: str, table: str, column: str, parts: Mapping[date, pa.Table]
    ) -> dict[date, int]:
        """``replace_partition`` for several values: each one's rows atomically replaced
        (a backend may do all of them in one transaction); returns the rows written each."""
        return {
            value: self.replace_partition(dataset, table, column, value, data)
            for value, data in parts.items()
        }

    @abstractmethod
    def read_table(
        self,
        dataset: str,
        table: str,
        *,
        date_column: str | None = None,
        start: date | None = None,
        end: date | None = None,
    ) -> pd.DataFrame:
        """Read a table, optionally only rows with ``start <= date_column < end``."""

    @abstractmethod
    def row_count(
        self, dataset: str, table: str, *, column: str | None = None, value: Any = None
    ) -> int:
        """Rows in a table (where ``column = value`` when given); 0 if it does not exist."""

    @abstractmethod
    def table_exists(self, dataset: str, table: str) -> bool: ...

    @abstractmethod
    def drop_dataset(self, dataset: str) -> bool:
        """Drop a dataset and everything in it; False if there was none (a closed pull
        request's datasets are dropped this way)."""

    @abstractmethod
    def ensure_datasets(self, datasets: Iterable[str]) -> None:
        """Create the datasets that do not exist yet, with this warehouse's defaults (a pull
        request's tables expire); called before dbt, which would create them without."""

    @abstractmethod
    def writer_turn(self, purpose: str) -> AbstractContextManager[None]:
        """Hold the warehouse for a writer that opens it itself (dbt), until the block ends:
        no other writer of this platform starts meanwhile. ``purpose`` says who holds it
        (in the message of a writer that waits too long)."""


def check_partition(data: pa.Table, table: str, column: str, value: date) -> None:
    """Every row of ``data`` carries ``column = value``; refused before anything is written."""
    if column not in data.column_names:
        raise WarehouseError(f"rows for {table} have no partition column {column!r}")
    others = {v for v in data.column(column).to_pylist() if v != value}
    if others:
        shown = ", ".join(sorted(str(v) for v in others)[:3])
        raise WarehouseError(
            f"rows for {table} partition {column}={value} carry other values ({shown}); "
            "refusing to write them into this partition"
        )
