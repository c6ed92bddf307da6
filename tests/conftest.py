from pathlib import Path

import pytest

from ml_platform.settings import Settings


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    """A local deployment whose warehouse, job store and templates live in tmp_path."""
    return Settings.from_env(
        {"ML_PLATFORM_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "home")}
    )
