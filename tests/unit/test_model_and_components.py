"""The model steps and the Kubeflow components, called as plain Python functions."""

# No `from __future__ import annotations`: the kfp components read annotations as types.
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kfp.dsl import Artifact, Metrics, Model

from ml_platform.pipelines import components
from ml_platform.pipelines import model as flight_model
from ml_platform.resources.warehouse.duckdb import DuckDBWarehouse


def flights(rows: int = 6000, seed: int = 7) -> pd.DataFrame:
    """Flights whose delays depend on the hour, rain and carrier, as real ones do."""
    rng = np.random.default_rng(seed)
    days = pd.to_datetime("2013-08-01") + pd.to_timedelta(rng.integers(0, 92, rows), unit="D")
    hour = rng.integers(5, 23, rows)
    precip = rng.exponential(0.05, rows) * (rng.random(rows) < 0.25)
    carrier = rng.choice(["UA", "B6", "EV", "DL"], rows)
    logit = -2.5 + 0.12 * (hour - 5) + 2.0 * (precip > 0.02) + (carrier == "EV") * 0.6
    delayed = rng.random(rows) < 1 / (1 + np.exp(-logit))
    frame = pd.DataFrame(
        {
            "flight_key": [f"k{i}" for i in range(rows)],
            "flight_date": days.date,
            "carrier": carrier,
            "origin": rng.choice(["EWR", "JFK", "LGA"], rows),
            "dest": rng.choice(["ATL", "ORD", "LAX", "BOS"], rows),
            "sched_dep_hour": hour,
            "month": days.month,
            "day_of_week": days.day_of_week + 1,
            "distance": rng.integers(200, 2500, rows),
            "temp": rng.normal(70, 10, rows),
            "dewp": rng.normal(55, 10, rows),
            "humid": rng.uniform(30, 100, rows),
            "wind_speed": rng.uniform(0, 25, rows),
            "wind_gust": np.where(rng.random(rows) < 0.8, np.nan, rng.uniform(20, 40, rows)),
            "precip": precip,
            "pressure": rng.normal(1015, 5, rows),
            "visib": rng.uniform(2, 10, rows),
            "plane_year": np.where(rng.random(rows) < 0.1, np.nan, rng.integers(1990, 2013, rows)),
            "plane_seats": rng.integers(50, 300, rows),
            "is_delayed": delayed,
            "split": np.where(rng.random(rows) < 0.2, "test", "train"),
        }
    )
    return frame


def test_split_keeps_flights_before_the_cutoff_on_their_side():
    frame = flights()
    train, test = flight_model.split_training_data(frame, date(2013, 10, 1))
    assert len(train) + len(test) == (pd.to_datetime(frame.flight_date) < "2013-10-01").sum()
    assert set(train.split) == {"train"} and set(test.split) == {"test"}
    assert pd.to_datetime(pd.concat([train, test]).flight_date).max() < pd.Timestamp("2013-10-01")


def test_split_names_what_is_wrong():
    with pytest.raises(
        flight_model.DataError, match=r"features.training_data lacks columns \['temp'\]"
    ):
        flight_model.split_training_data(
            flights().drop(columns="temp"), date(2013, 10, 1), "features.training_data"
        )
    unlabelled = flights().astype({"is_delayed": "boolean"})
    unlabelled.loc[(unlabelled.flight_date < date(2013, 9, 1)).idxmax(), "is_delayed"] = None
    with pytest.raises(flight_model.DataError, match="cancelled flights must be excluded"):
        flight_model.split_training_data(unlabelled, date(2013, 10, 1))
    with pytest.raises(flight_model.DataError, match="no usable train rows"):
        flight_model.split_training_data(flights(), date(2013, 8, 1))


def test_the_model_learns_more_than_the_baseline_and_round_trips(tmp_path: Path):
    train, test = flight_model.split_training_data(flights(), date(2013, 11, 1))
    model = flight_model.train_model(train)
    evaluation, curves = flight_model.evaluate(model, train, test)
    # Rain matters here and the carrier x hour baseline cannot see it.
    assert evaluation.roc_auc > evaluation.baseline_roc_auc > 0.55
    assert 0 < evaluation.brier_score < evaluation.baseline_brier_score + 0.01
    assert evaluation.test_rows == len(test)
    version = flight_model.save_model(model, tmp_path / "model")
    loaded, loaded_version = flight_model.load_model(tmp_path / "model")
    assert loaded_version == version and version.startswith("sha256:")
    np.testing.assert_allclose(
        flight_model.predict_proba(loaded, test), flight_model.predict_proba(model, test)
    )
    flight_model.plot_evaluation(evaluation, curves, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_categories_score_instead_of_failing():
    train, _ = flight_model.split_training_data(flights(), date(2013, 11, 1))
    model = flight_model.train_model(train)
    new = train.head(5).assign(carrier="ZZ", dest="XXX")
    probabilities = flight_model.predict_proba(model, new)
    assert ((probabilities > 0) & (probabilities < 1)).all()


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"", "wrong header"), (b"PK\x03\x04zip", "wrong header"), (None, "cannot read")],
)
def test_an_unreadable_model_artifact_is_named(tmp_path: Path, content, problem):
    path = tmp_path / "model"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(flight_model.ModelArtifactError, match=problem) as error:
        flight_model.load_model(path)
    assert str(path) in str(error.value)


def test_a_truncated_model_artifact_is_named(tmp_path: Path):
    train, _ = flight_model.split_training_data(flights(600), date(2013, 11, 1))
    flight_model.save_model(flight_model.train_model(train), tmp_path / "model")
    payload = (tmp_path / "model").read_bytes()
    (tmp_path / "model").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(flight_model.ModelArtifactError, match="is corrupt"):
        flight_model.load_model(tmp_path / "model")


def test_score_flights_keeps_only_the_day():
    frame = flights()
    train, _ = flight_model.split_training_data(frame, date(2013, 11, 1))
    model = flight_model.train_model(train)
    day = date(2013, 9, 15)
    table = flight_model.score_flights(model, "sha256:abc", frame, day, "job-1")
    assert table.schema == flight_model.predictions_schema()
    assert table.num_rows == (frame.flight_date == day).sum() > 0
    assert set(table.column("flight_date").to_pylist()) == {day}
    assert set(table.column("pipeline_job").to_pylist()) == {"job-1"}
    empty = flight_model.score_flights(model, "sha256:abc", frame, date(2013, 12, 31), "job-1")
    assert empty.num_rows == 0 and empty.schema == flight_model.predictions_schema()
    # Several days in one pass: each day's table holds what scoring it alone gives.
    days = [date(2013, 9, 14), day, date(2013, 12, 31)]
    together = flight_model.score_days(model, "sha256:abc", frame, days, "job-1")
    assert list(together) == days
    for each in days:
        alone = flight_model.score_flights(model, "sha256:abc", frame, each, "job-1")
        assert together[each].drop(["scored_at"]).equals(alone.drop(["scored_at"]))


def artifact(kind, path: Path):
    return kind(name=path.name, uri=str(path), metadata={})


def test_the_components_as_plain_functions(tmp_path: Path):
    """train and evaluate -> score, through the component functions and a real DuckDB."""
    warehouse = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    frame = flights()
    import pyarrow as pa

    warehouse.replace_table("features", "training_data", pa.Table.from_pandas(frame))
    warehouse.replace_table("features", "flight_features", pa.Table.from_pandas(frame))

    def train(name: str, champion_model_uri: str = ""):
        outputs = {
            "model": artifact(Model, tmp_path / name / "model"),
            "metrics": artifact(Metrics, tmp_path / name / "metrics"),
            "evaluation_plot": artifact(Artifact, tmp_path / name / "plot"),
        }
        (tmp_path / name).mkdir()
        returned = components.train_and_evaluate.python_func(
            warehouse_uri=warehouse.uri,
            dataset="features",
            table="training_data",
            cutoff_date="2013-10-01",
            champion_model_uri=champion_model_uri,
            max_iter=300,
            **outputs,
        )
        return returned, outputs["model"], outputs["metrics"].metadata, outputs["evaluation_plot"]

    (auc, baseline, oot_auc, fingerprint), model, metrics, plot = train("first")
    dates = pd.to_datetime(frame.flight_date)
    window = (dates >= "2013-09-10") & (dates < "2013-10-01")  # the 21 days before the cutoff
    assert model.metadata["validation_rows"] == metrics["oot_rows"] == window.sum() > 0
    assert (
        model.metadata["train_rows"] + model.metadata["test_rows"] == (dates < "2013-09-10").sum()
    )
    assert model.metadata["validation_window"] == "2013-09-10 .. 2013-10-01"
    assert model.metadata["version"].startswith("sha256:")
    assert fingerprint.startswith("sha256:")
    assert metrics["roc_auc"] == auc and metrics["baseline_roc_auc"] == baseline
    assert metrics["oot_roc_auc"] == oot_auc > metrics["oot_baseline_roc_auc"]
    assert "champion_oot_roc_auc" not in metrics
    assert Path(plot.path).read_bytes().startswith(b"\x89PNG")
    # With a champion (here the first model), it is re-scored on the same window; the same
    # rows give the same fingerprint and, trained the same way, the same model.
    (_, _, _, again), second, metrics, _ = train("second", champion_model_uri=model.path)
    assert again == fingerprint and second.metadata["version"] == model.metadata["version"]
    assert metrics["champion_oot_roc_auc"] == metrics["oot_roc_auc"]
    assert metrics["champion_oot_log_loss"] == metrics["oot_log_loss"]
    quantiles = [metrics[f"oot_score_q{i}"] for i in range(1, 10)]
    assert quantiles == sorted(quantiles) and 0 < quantiles[0] < quantiles[-1] < 1
    scoring = dict(
        model=model,
        warehouse_uri=warehouse.uri,
        features_dataset="features",
        features_table="flight_features",
        predictions_dataset="predictions",
        predictions_table="flight_delay_predictions",
        flight_date="2013-10-02",
        days=1,
        pipeline_job="job-1",
    )
    rows, by_day, mean, version = components.score_flights.python_func(**scoring)
    expected = (frame.flight_date == date(2013, 10, 2)).sum()
    assert rows == expected and by_day == {"2013-10-02": expected}
    assert 0 < mean < 1 and version == model.metadata["version"]
    # Scoring the day again replaces its rows.
    components.score_flights.python_func(**scoring)

    def stored(day: date) -> int:
        return warehouse.row_count(
            "predictions", "flight_delay_predictions", column="flight_date", value=day
        )

    assert stored(date(2013, 10, 2)) == expected
    # A range is one call: each day replaced on its own, each with its own count.
    rows, by_day, _, _ = components.score_flights.python_func(**{**scoring, "days": 3})
    expected_by_day = {
        day.isoformat(): int((frame.flight_date == day).sum())
        for day in (date(2013, 10, 2), date(2013, 10, 3), date(2013, 10, 4))
    }
    assert by_day == expected_by_day and rows == sum(expected_by_day.values())
    assert {day: stored(date.fromisoformat(day)) for day in by_day} == expected_by_day
