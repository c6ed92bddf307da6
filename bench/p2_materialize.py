"""P2: the main command (`ml-platform materialize`) on the full data, timed end to end.

It runs in a scratch data folder and Dagster home, so it neither reads nor disturbs the
project's own. Peak RSS is that of the largest process in the tree (the training
component, usually).

    uv run python bench/p2_materialize.py [--days 7]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from measure import measure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=7)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="p2-"))
    try:
        shutil.copy(Path(__file__).parents[1] / "dagster_home" / "dagster.yaml", scratch)
        sample = measure(
            [sys.executable, "-m", "ml_platform.cli", "materialize", "--days", str(args.days)],
            env={"ML_PLATFORM_DATA_DIR": str(scratch / "data"), "DAGSTER_HOME": str(scratch)},
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"P2 main command on the full data (336,776 flights, {args.days} days scored)")
    print(f"  wall time {sample.seconds:7.1f} s   peak RSS {sample.peak_rss_mb:6.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
