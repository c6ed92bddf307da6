"""P1: importing the code location against importing dagster + dagster_dbt alone.

Every run, step process and code server imports ml_platform.definitions, so its import
cost is paid over and over. The two commands alternate in one run (the machine is noisy),
and the figure that matters is the ratio of medians; the goal is <= 1.25.

    uv run python bench/p1_import_cost.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import sys

from measure import measure, summary

COMMANDS = {
    "import ml_platform.definitions": [sys.executable, "-c", "import ml_platform.definitions"],
    "import dagster, dagster_dbt": [sys.executable, "-c", "import dagster, dagster_dbt"],
}
GOAL = 1.25


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    for command in COMMANDS.values():  # warm the file cache and .pyc files once
        measure(command)
    samples: dict[str, list] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            samples[name].append(measure(command))
    medians = {name: summary(values) for name, values in samples.items()}
    ours, baseline = medians.values()
    print(f"P1 import cost, median of {args.rounds} alternating rounds")
    for name, value in medians.items():
        print(f"  {name:<34} {value.seconds:6.2f} s   peak RSS {value.peak_rss_mb:6.0f} MB")
    time_ratio = ours.seconds / baseline.seconds
    rss_ratio = ours.peak_rss_mb / baseline.peak_rss_mb
    verdict = "meets" if time_ratio <= GOAL else "misses"
    print(f"  ratio: time {time_ratio:.2f}x, RSS {rss_ratio:.2f}x ({verdict} the goal <= {GOAL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
