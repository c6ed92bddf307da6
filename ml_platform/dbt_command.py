"""``ml-platform-dbt``: dbt's own command line, for Dagster's dbt resource (its
``dbt_executable``), except that ``--version`` answers from the installed package.

dagster-dbt runs ``dbt --version`` once per resource (per run locally, per step process on
Google Cloud) only to read dbt-core's version number. dbt answers it by importing all of
itself and asking PyPI for the latest release (a request of up to a second, on machines that
may have no internet): 2.7 s, against 0.05 s here. Every other command is dbt's own
``dbt.cli.main:cli``, the function the ``dbt`` script itself calls.
"""

from __future__ import annotations

import sys
from importlib.metadata import version


def main() -> int:
    if sys.argv[1:] == ["--version"]:
        # dbt's own first lines; dagster-dbt reads the first version number it prints.
        print(f"Core:\n  - installed: {version('dbt-core')}")
        return 0
    from dbt.cli.main import cli

    return cli()


if __name__ == "__main__":
    sys.exit(main())
