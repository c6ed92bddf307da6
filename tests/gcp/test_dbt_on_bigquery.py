"""The dbt project is portable: dbt-bigquery (on the emulator) and dbt-duckdb agree.

The same slice of the raw data goes into BigQuery datasets (a branch deployment's names)
and into a DuckDB file (the local deployment's), both through the Warehouse interface.
dbt builds staging and features on both, as the `dbt_features` asset does (models and
their tests, from the same profile targets Dagster uses: `local`, and the real `branch`
target with a dummy token instead of Application Default Credentials). The same
prediction rows are written to both, then dbt builds the reporting models as the
`dbt_reporting` asset does. Then every model is compared: row counts, the split of every
flight, the features themselves and the reporting aggregates (floats to 1e-9).
"""

from __future__ import annotations

import hashlib
import math
from datetime import date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from ml_platform.assets.ingest import load_raw_tables
from ml_platform.pipelines import model as flight_model
from ml_platform.resources.warehouse import Warehouse
from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse
from ml_platform.settings import Deployment, Settings
from tests.gcp.bigquery_emulator import (
    EMULATOR_TARGET,
    LOCATION,
    PROJECT,
    Emulator,
    Tripwire,
    bigquery_warehouse,
    bq_emulator,
    running,
    start_dbt,
    write_emulator_profiles,
)

__all__ = ["bq_emulator"]  # the fixture, imported for pytest

# Six days of flights: enough for the split test's 1,000-flight threshold, quick to build.
START, END = date(2013, 9, 28), date(2013, 10, 3)
SCORED_DAYS = (date(2013, 10, 1), date(2013, 10, 2))
CUTOFF = date(2013, 10, 1)
# A prediction whose flight is not in flight_features (it exercises has_features = 0).
ORPHAN_KEY = "2013-10-01|ZZ|1|EWR|100"

FEATURES_SELECTION = ["--exclude", "tag:reporting", "source:predictions"]
REPORTING_SELECTION = ["--select", "tag:reporting", "source:predictions"]

# Model -> the columns that identify a row.
MODELS = {
    "staging": {
        "stg_flights": ["flight_key"],
        "stg_weather": ["origin", "time_hour"],
        "stg_planes": ["tailnum"],
        "stg_airports": ["faa"],
        "stg_airlines": ["carrier"],
    },
    "features": {"flight_features": ["flight_key"], "training_data": ["flight_key"]},
    "reporting": {
        "scored_flights": ["flight_key"],
        "daily_delay_report": ["flight_date"],
        "carrier_route_risk": ["carrier", "origin", "dest"],
        "prediction_calibration": ["model_version", "decile"],
    },
}


def bigquery_dbt_vars(settings: Settings) -> dict[str, object]:
    """What the BigQuery targets read from --vars (see dbt_project/profiles.yml).

    Settings.dbt_vars gives `datasets`; the BigQuery targets also read `gcp_project`,
    `bigquery_location` and `bigquery_api_endpoint`.
    """
    dbt_vars: dict[str, object] = {
        "gcp_project": settings.gcp_project,
        "bigquery_location": settings.bigquery_location,
    }
    if settings.bigquery_api_endpoint:
        dbt_vars["bigquery_api_endpoint"] = settings.bigquery_api_endpoint
    return {**dbt_vars, **settings.dbt_vars}


def probability(key: str) -> float:
    # Multiples of 1/1024: sums and means are exact in binary floating point, so both
    # warehouses compute the very same values and rank ties cannot flip on rounding.
    return (int(hashlib.md5(key.encode()).hexdigest()[:8], 16) % 1023 + 1) / 1024


def predictions_for(day: date, flight_keys: list[str]) -> pa.Table:
    rows = len(flight_keys)
    return pa.table(
        {
            "flight_key": flight_keys,
            "flight_date": [day] * rows,
            "delay_probability": [probability(key) for key in flight_keys],
            "model_version": ["sha256:portability"] * rows,
            "pipeline_job": [f"flight-delay-predictions-{day}"] * rows,
            "scored_at": [datetime(2013, 10, 5, 6, 0)] * rows,
        },
        schema=flight_model.predictions_schema(),
    )


class Side:
    """One warehouse with its deployment settings and dbt target."""

    def __init__(self, name: str, settings: Settings, warehouse: Warehouse, target: str, dbt_vars):
        self.name, self.settings, self.warehouse = name, settings, warehouse
        self.target, self.dbt_vars = target, dbt_vars
        self._tables: dict[tuple[str, str], pd.DataFrame] = {}

    def dataset(self, layer: str) -> str:
        return self.settings.dataset(layer)

    def read(self, layer: str, model: str) -> pd.DataFrame:
        # Read once: the tables do not change after the fixture built them.
        if (layer, model) not in self._tables:
            self._tables[layer, model] = self.warehouse.read_table(self.dataset(layer), model)
        return self._tables[layer, model].copy()


@pytest.fixture(scope="module")
def sides(bq_emulator: Emulator, tmp_path_factory, request) -> dict[str, Side]:
    """Both warehouses after the whole dbt project ran on them, as Dagster runs it."""
    root = tmp_path_factory.mktemp("portability")
    branch = Settings(
        deployment=Deployment.BRANCH,
        pull_request_id="4242",
        gcp_project=PROJECT,
        gcs_bucket="unused-in-this-test",
        bigquery_location=LOCATION,
        bigquery_api_endpoint=bq_emulator.endpoint,
    )
    local = Settings(deployment=Deployment.LOCAL, data_dir=root / "data")
    bigquery = Side(
        "bigquery",
        branch,
        bigquery_warehouse(bq_emulator.endpoint),
        EMULATOR_TARGET,
        bigquery_dbt_vars(branch),
    )
    duckdb = Side("duckdb", local, DuckDBWarehouse(local.duckdb_path), "local", local.dbt_vars)
    both = {"bigquery": bigquery, "duckdb": duckdb}
    profiles = write_emulator_profiles(root / "profiles").parent
    tripwire = Tripwire()
    request.addfinalizer(tripwire.close)

    def build(step: str, selection: list[str]) -> None:
        runs = [
            start_dbt(
                f"{side.name}-{step}",
                ["build", *selection],
                target=side.target,
                dbt_vars=side.dbt_vars,
                work_dir=root / side.name,
                profiles_dir=profiles,
                tripwire=tripwire,
            )
            for side in both.values()
        ]
        # Side by side: most of a dbt command is its start-up and parse.
        with running(*runs):
            for run in runs:
                run.wait()

    for side in both.values():
        counts = load_raw_tables(side.warehouse, side.dataset("raw"), start=START, end=END)
        assert counts["flights"] > 1000
    build("features", FEATURES_SELECTION)

    # The same predictions into both warehouses, through the Warehouse interface: every
    # flight of the scored days (read from BigQuery), and one flight that has no features.
    for day in SCORED_DAYS:
        features = bigquery.warehouse.read_table(
            bigquery.dataset("features"),
            "flight_features",
            date_column=flight_model.DATE,
            start=day,
            end=day + timedelta(days=1),
        )
        keys = sorted(features[flight_model.KEY])
        if day == SCORED_DAYS[0]:
            keys.append(ORPHAN_KEY)
        rows = predictions_for(day, keys)
        for side in both.values():
            written = side.warehouse.replace_partition(
                side.dataset("predictions"),
                "flight_delay_predictions",
                flight_model.DATE,
                day,
                rows,
            )
            assert written == len(keys)
    build("reporting", REPORTING_SELECTION)
    # dbt-bigquery talked to the emulator only: no token refresh, no metadata server.
    assert not tripwire.attempts, f"dbt tried to reach Google: {tripwire.attempts}"
    return both


def normalized(frame: pd.DataFrame, keys: list[str]) -> list[dict[str, object]]:
    """Rows as plain Python values, sorted by their keys (dtypes differ between backends)."""

    def plain(value: object) -> object:
        if value is None or value is pd.NA or value is pd.NaT:
            return None
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, pd.Timestamp):
            return value.to_pydatetime()
        if hasattr(value, "item"):  # numpy scalars
            return value.item()
        return value

    records = [
        {column: plain(value) for column, value in row.items()}
        for row in frame.astype(object).to_dict(orient="records")
    ]
    return sorted(records, key=lambda row: tuple(str(row[k]) for k in keys))


def differences(left: list[dict], right: list[dict], limit: int = 5) -> list[str]:
    found = []
    if len(left) != len(right):
        found.append(f"{len(left)} rows vs {len(right)} rows")
    for a, b in zip(left, right, strict=False):
        for column in a:
            x, y = a[column], b.get(column)
            if isinstance(x, bool) or isinstance(y, bool):
                same = (x is not None and y is not None and int(x) == int(y)) or x == y
            elif isinstance(x, float) or isinstance(y, float):
                same = (x is None and y is None) or (
                    x is not None
                    and y is not None
                    and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
                )
            else:
                same = x == y
            if not same:
                found.append(f"{column}: {x!r} vs {y!r} in {a}")
                if len(found) >= limit:
                    return found
    return found


@pytest.mark.parametrize(
    ("layer", "model"),
    [(layer, model) for layer, models in MODELS.items() for model in models],
)
def test_every_model_has_the_same_rows_on_both(sides: dict[str, Side], layer: str, model: str):
    keys = MODELS[layer][model]
    bigquery = sides["bigquery"].read(layer, model)
    duckdb = sides["duckdb"].read(layer, model)
    assert sorted(bigquery.columns) == sorted(duckdb.columns)
    assert len(bigquery) == len(duckdb) > 0
    found = differences(normalized(bigquery, keys), normalized(duckdb[bigquery.columns], keys))
    assert not found, f"{model} differs (BigQuery vs DuckDB):\n" + "\n".join(found)


def test_every_flight_lands_on_the_same_side_of_the_split(sides: dict[str, Side]):
    splits = {}
    for name, side in sides.items():
        features = side.read("features", "flight_features")
        splits[name] = dict(zip(features["flight_key"], features["split"], strict=True))
    assert splits["bigquery"] == splits["duckdb"]
    # And both agree with the Python formula of the split (macros/train_test_split.sql).
    for key, split in splits["bigquery"].items():
        bucket = int(hashlib.md5(key.encode()).hexdigest()[:15], 16) % 10
        assert split == ("test" if bucket < 2 else "train"), key


def summary(side: Side) -> dict[str, object]:
    features = side.read("features", "flight_features")
    training = side.read("features", "training_data")
    daily = side.read("reporting", "daily_delay_report").sort_values("flight_date")
    risk = side.read("reporting", "carrier_route_risk")
    calibration = side.read("reporting", "prediction_calibration").sort_values(
        ["model_version", "decile"]
    )
    delayed = training["is_delayed"].astype(float)
    return {
        "rows": {
            model: len(side.read(layer, model))
            for layer, models in MODELS.items()
            for model in models
        },
        "split sizes": training["split"].value_counts().sort_index().to_dict(),
        "features split sizes": features["split"].value_counts().sort_index().to_dict(),
        "delay rate": round(float(delayed.mean()), 12),
        "delay rate by split": {
            split: round(float(delayed[training["split"] == split].mean()), 12)
            for split in ("test", "train")
        },
        "cancelled": int(features["is_cancelled"].astype(bool).sum()),
        "daily flights scored": [int(v) for v in daily["flights_scored"]],
        "daily actual delay rate": [round(float(v), 12) for v in daily["actual_delay_rate"]],
        "daily predicted delay rate": [round(float(v), 12) for v in daily["predicted_delay_rate"]],
        "daily brier score": [round(float(v), 12) for v in daily["brier_score"]],
        "daily without features": [int(v) for v in daily["flights_without_features"]],
        "routes": len(risk),
        "riskiest route per carrier": sorted(
            f"{r.carrier}:{r.origin}-{r.dest}" for r in risk.itertuples() if r.risk_rank == 1
        ),
        "routes with a predicted delay rate": int(risk["predicted_delay_rate"].notna().sum()),
        "route predicted delay rate, summed": round(float(risk["predicted_delay_rate"].sum()), 9),
        "calibration flights": [int(v) for v in calibration["flights"]],
        "calibration gap": [round(float(v), 12) for v in calibration["calibration_gap"]],
    }


def test_split_sizes_delay_rates_and_reporting_aggregates_agree(sides: dict[str, Side]):
    bigquery, duckdb = summary(sides["bigquery"]), summary(sides["duckdb"])
    print("\nportability summary (BigQuery emulator vs DuckDB):")
    for name, value in bigquery.items():
        print(f"  {name}: {value}" + ("" if value == duckdb[name] else f" vs {duckdb[name]}"))
    for name in bigquery:
        left, right = bigquery[name], duckdb[name]
        if isinstance(left, list) and left and isinstance(left[0], float):
            assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(left, right, strict=True))
        else:
            assert left == right, name
    assert bigquery["daily without features"] == [1, 0]
    assert set(bigquery["split sizes"]) == {"test", "train"}


def test_training_reads_bigquery_like_duckdb(sides: dict[str, Side]):
    """The training component's read: the same frames from both warehouses."""
    frames = {}
    for name, side in sides.items():
        rows = side.warehouse.read_table(
            side.dataset("features"), "training_data", date_column=flight_model.DATE, end=CUTOFF
        )
        frames[name] = flight_model.split_training_data(rows, CUTOFF, f"{name} training_data")
    for part in (0, 1):
        bigquery, duckdb = frames["bigquery"][part], frames["duckdb"][part]
        assert list(bigquery[flight_model.KEY]) == list(duckdb[flight_model.KEY])
        assert len(bigquery) > 100
        pd.testing.assert_frame_equal(
            flight_model._feature_frame(bigquery), flight_model._feature_frame(duckdb)
        )


def test_the_emulator_target_is_the_branch_target_with_a_dummy_token(tmp_path: Path):
    import yaml

    profiles = yaml.safe_load(write_emulator_profiles(tmp_path).read_text())["ml_platform"]
    outputs = profiles["outputs"]
    emulator, branch = outputs[EMULATOR_TARGET], outputs["branch"]
    assert branch["type"] == "bigquery" and branch["method"] == "oauth"
    assert outputs["prod"] == branch
    for key in ("project", "location", "dataset", "api_endpoint"):
        assert emulator[key] == branch[key]
    assert emulator["method"] == "oauth-secrets"
