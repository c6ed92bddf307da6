"""P8: a backfill of predictions, 7 days against 92 days (2013-10-01 .. 12-31), each one
Dagster run and one pipeline job (the single-run backfill policy), on the full data.

The data folder is prepared once (ingest, features, a champion model: what `make run` does
first); then the two backfills alternate, each a fresh process running the `score_flights`
job over its partition range as the UI's "single run" backfill launches it, and the ratio of
medians is the figure (goal: 92 days at most 1.5x the time of 7).

    uv run python bench/p8_backfill.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import measure, summary

PROJECT = Path(__file__).resolve().parents[1]
RANGES = {"7 days": ("2013-10-01", "2013-10-07"), "92 days": ("2013-10-01", "2013-12-31")}
# One run of score_flights over a partition range, in this process, as a run worker would.
SCORE = """
import sys
import dagster as dg
from ml_platform.definitions import defs
start, end = sys.argv[1:3]
tags = {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end}
with dg.DagsterInstance.get() as instance:
    result = defs.resolve_job_def("score_flights").execute_in_process(instance=instance, tags=tags)
    assert result.success
"""
PREPARE = """
import dagster as dg
from ml_platform.definitions import defs
with dg.DagsterInstance.get() as instance:
    assert defs.resolve_job_def("train_flight_delay_model").execute_in_process(
        instance=instance
    ).success
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # A fresh data folder and instance: a pipeline job of the same work that succeeded and
    # that this instance has not recorded would be reused instead of run (the reattach rule).
    root = Path(tempfile.mkdtemp(prefix="p8-"))
    data = root / "data"
    env = {
        "ML_PLATFORM_DATA_DIR": str(data),
        "DAGSTER_HOME": str(root / "home"),
        "PYTHONPATH": str(PROJECT),
    }
    (root / "home").mkdir()
    (root / "home" / "dagster.yaml").write_text("")  # an instance of its own, no queue
    subprocess.run([sys.executable, "-c", PREPARE], env={**os.environ, **env}, check=True)
    samples: dict[str, list] = {name: [] for name in RANGES}
    for _ in range(args.rounds):
        for name, (start, end) in RANGES.items():
            command = [sys.executable, "-c", SCORE, start, end]
            samples[name].append(measure(command, env))
    medians = {name: summary(values).seconds for name, values in samples.items()}
    print(f"P8 backfill of predictions, one run each, median of {args.rounds} alternating rounds")
    for name, seconds in medians.items():
        print(f"  {name:<8} {seconds:6.2f} s")
    print(f"  ratio 92 / 7 days: {medians['92 days'] / medians['7 days']:.2f}x (goal <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
