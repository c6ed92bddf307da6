"""P5: what a dbt command of the dbt assets pays for parsing, with the project's saved parse
made as the code location now prepares it (the vars and target of the runs) against one made
without the vars (as before: dbt then parses the whole project again).

Both start from a copy of their saved parse in a fresh target folder, as each dbt command of
the assets does, and run `dbt parse` with the runs' vars; they alternate (the machine is noisy)
and the ratio of medians is the figure.

    uv run python bench/p5_dbt_parse.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import measure, summary

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from ml_platform.settings import DBT_EXECUTABLE, DBT_PROJECT_DIR, get_settings  # noqa: E402


def dbt_parse(target: Path, extra: list[str]) -> list[str]:
    return [str(DBT_EXECUTABLE), "parse", "--quiet", "--target-path", str(target), *extra]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    runs_vars = ["--vars", json.dumps(get_settings().dbt_vars)]
    env = {"DBT_PROFILES_DIR": str(DBT_PROJECT_DIR)}
    scratch = Path(tempfile.mkdtemp(prefix="p5-"))
    try:
        saved = {"prepared with the runs' vars": runs_vars, "prepared without them": []}
        for name, extra in saved.items():
            subprocess.run(dbt_parse(scratch / name, extra), cwd=DBT_PROJECT_DIR, check=True)
        samples: dict[str, list] = {name: [] for name in saved}
        for i in range(rounds):
            for name in saved:
                target = scratch / f"run-{i}-{len(samples[name])}-{name}"
                target.mkdir()
                shutil.copy(scratch / name / "partial_parse.msgpack", target)
                command = ["sh", "-c", f'cd "{DBT_PROJECT_DIR}" && exec "$@"', "sh"]
                samples[name].append(measure([*command, *dbt_parse(target, runs_vars)], env))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {name: summary(values).seconds for name, values in samples.items()}
    print(f"P5 `dbt parse` of a dbt asset's command, median of {rounds} alternating rounds")
    for name, seconds in medians.items():
        print(f"  saved parse {name:<30} {seconds:5.2f} s")
    with_vars, without = medians.values()
    print(f"  ratio: {with_vars / without:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
