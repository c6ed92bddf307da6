from pathlib import Path

import pytest

from ml_platform.settings import Settings


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    """A local deployment whose warehouse, job store and templates live in tmp_path."""
    return Settings.from_env(
        {"ML_PLATFORM_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "home")}
    )


def pytest_sessionfinish(session, exitstatus):
    # ml_platform.definitions freezes what the garbage collector tracks (see P1); in this
    # process that includes DuckDB objects the tests made before importing it, which would
    # never be collected, and DuckDB's bindings report them as leaks at exit.
    import gc

    gc.unfreeze()
    gc.collect()
