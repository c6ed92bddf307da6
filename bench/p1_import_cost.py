"""P1: importing the code location against importing dagster + dagster_dbt alone.

Every run, step process and code server imports ml_platform.definitions, so its import
cost is paid over and over. The two commands alternate in one run (the machine is noisy),
and the figure that matters is the ratio of medians; the goal is <= 1.25.

Wall time on a shared 2-core machine still moves by a few percent between runs, so
``--instructions`` adds a figure that does not: the instructions each import executes,
counted by valgrind's callgrind (both under valgrind at once, about 2 minutes). It leaves
out what instructions miss (cache misses, of which the garbage collector's passes over
a large heap have many), so it is a floor for the wall-time ratio, not a substitute.

    uv run python bench/p1_import_cost.py [--rounds 10] [--instructions]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

from measure import measure, summary

COMMANDS = {
    "import ml_platform.definitions": [sys.executable, "-c", "import ml_platform.definitions"],
    "import dagster, dagster_dbt": [sys.executable, "-c", "import dagster, dagster_dbt"],
}
# ml_platform.definitions ends with gc.freeze(), which spares the exit's collections. The
# same trick on the baseline gives the like-for-like ratio: what the import itself adds.
REFERENCE = {
    "  same, then gc.freeze()": [
        sys.executable, "-c", "import dagster, dagster_dbt, gc; gc.freeze()"
    ],
}  # fmt: skip
GOAL = 1.25


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--instructions", action="store_true", help="also count instructions with callgrind"
    )
    args = parser.parse_args()
    every = {**COMMANDS, **REFERENCE}
    for command in every.values():  # warm the file cache and .pyc files once
        measure(command)
    samples: dict[str, list] = {name: [] for name in every}
    for _ in range(args.rounds):
        for name, command in every.items():
            samples[name].append(measure(command))
    medians = {name: summary(values) for name, values in samples.items()}
    ours, baseline, frozen = medians.values()
    print(f"P1 import cost, median of {args.rounds} alternating rounds")
    for name, value in medians.items():
        print(f"  {name:<34} {value.seconds:6.2f} s   peak RSS {value.peak_rss_mb:6.0f} MB")
    time_ratio = ours.seconds / baseline.seconds
    rss_ratio = ours.peak_rss_mb / baseline.peak_rss_mb
    verdict = "meets" if time_ratio <= GOAL else "misses"
    print(f"  ratio: time {time_ratio:.2f}x, RSS {rss_ratio:.2f}x ({verdict} the goal <= {GOAL})")
    print(f"  like for like (both frozen): time {ours.seconds / frozen.seconds:.2f}x")
    if args.instructions:
        print_instruction_counts()
    return 0


def print_instruction_counts() -> None:
    if shutil.which("valgrind") is None:
        print("  instructions: valgrind is not installed (apt-get install valgrind)")
        return
    # Counts do not depend on load, so both run at once.
    running = {
        name: subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, command in COMMANDS.items()
    }
    counts = {}
    for name, process in running.items():
        _, stderr = process.communicate()
        found = re.search(r"refs:\s+([\d,]+)", stderr)
        if process.returncode != 0 or found is None:
            raise SystemExit(f"callgrind failed for {name}:\n{stderr[-2000:]}")
        counts[name] = int(found.group(1).replace(",", ""))
        print(f"  {name:<34} {counts[name] / 1e9:6.2f} G instructions")
    ours, baseline = counts.values()
    print(f"  ratio: instructions {ours / baseline:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
