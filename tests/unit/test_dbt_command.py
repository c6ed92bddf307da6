"""ml-platform-dbt, the dbt command Dagster's dbt resource runs: dbt's own command line, with
a --version that neither imports dbt nor asks PyPI."""

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from ml_platform.settings import DBT_EXECUTABLE, DBT_PROJECT_DIR

BIN = Path(sys.executable).parent


def test_version_is_dbt_cores_in_the_form_dagster_dbt_reads_without_importing_dbt():
    answered = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.argv = ['ml-platform-dbt', '--version']\n"
            "from ml_platform.dbt_command import main\n"
            "assert main() == 0\n"
            "assert not [m for m in sys.modules if m == 'dbt' or m.startswith('dbt.')]",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    # dagster-dbt takes the first x.y.z it finds in the output.
    assert re.search(r"(\d+\.\d+\.\d+)", answered.stdout).group(1) == version("dbt-core")


def test_every_other_command_is_dbts_own(tmp_path: Path):
    assert DBT_EXECUTABLE == BIN / "ml-platform-dbt" and DBT_EXECUTABLE.exists()
    # In a scratch target folder: the project's own holds the parse the code location uses.
    ls = ["ls", "--resource-type", "model", "--output", "name", "--quiet"]
    ls += ["--target-path", str(tmp_path / "target"), "--log-path", str(tmp_path / "logs")]
    ours = subprocess.run(
        [str(DBT_EXECUTABLE), *ls],
        cwd=DBT_PROJECT_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    theirs = subprocess.run(
        [str(BIN / "dbt"), *ls],
        cwd=DBT_PROJECT_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ours.returncode == theirs.returncode == 0, ours.stderr + ours.stdout
    assert ours.stdout == theirs.stdout and "flight_features" in ours.stdout
