import json
import subprocess
import sys

import dagster as dg

from ml_platform.definitions import build_definitions

# Top-level packages, plus any Google Cloud SDK (the bare `google.cloud` namespace package,
# which some dependency touches, costs nothing).
HEAVY = ("kfp", "sklearn", "pandas", "pyarrow", "duckdb", "matplotlib", "google.cloud.")


def test_the_definitions_load(local_settings):
    defs = build_definitions(local_settings)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {
        "raw/flights",
        "raw/weather",
        "staging/stg_flights",
        "features/flight_features",
        "features/training_data",
        "flight_delay_model",
        "flight_delay_predictions",
        "reporting/daily_delay_report",
        "reporting/carrier_route_risk",
        "reporting/prediction_calibration",
    } <= keys

    def parents(key: str) -> set[str]:
        node = graph.get(dg.AssetKey.from_user_string(key))
        return {parent.to_user_string() for parent in node.parent_keys}

    assert parents("staging/stg_flights") == {"raw/flights"}
    assert parents("flight_delay_model") == {"features/training_data"}
    assert "flight_delay_model" in parents("flight_delay_predictions")
    assert "flight_delay_predictions" in parents("reporting/scored_flights")
    assert parents("reporting/daily_delay_report") == {"reporting/scored_flights"}
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert ("flight_delay_model", "beats_baseline") in checks
    assert ("features/training_data", "not_null_training_data_is_delayed") in checks
    assert any(key == "raw/flights" for key, _ in checks)  # dbt source tests
    assert {job.name for job in defs.jobs} >= {
        "train_flight_delay_model",
        "score_flights",
        "refresh_reporting",
    }


def test_importing_the_code_location_loads_no_heavy_library():
    code = (
        "import json, sys; import ml_platform.definitions; "
        f"heavy = {HEAVY!r}; "
        "print(json.dumps(sorted({h for h in heavy for m in sys.modules "
        "if m == h or m.startswith(h if h.endswith('.') else h + '.')})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(loaded.strip().splitlines()[-1]) == []
