"""The command line refuses bad input with one clear line, before touching anything."""

import pytest

from ml_platform import cli
from ml_platform.settings import get_settings


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("ML_PLATFORM_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()  # resolved once per process: resolve it from this env
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize("argv", [["materialize"], ["pipelines", "list"], ["pipelines", "compile"]])
def test_bad_settings_are_one_line_not_a_traceback(monkeypatch, argv):
    monkeypatch.setenv("ML_PLATFORM_VERTEX_CACHING", "maybe")
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert str(exit.value.code) == (
        "ml-platform: ML_PLATFORM_VERTEX_CACHING must be true or false, got 'maybe'"
    )


def test_a_prediction_day_outside_the_partitions_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"--date 2014-01-01: .* the days of 2013"):
        cli.main(["pipelines", "run", "prediction", "--date", "2014-01-01"])
    assert not (tmp_path / "data" / "pipeline_jobs.sqlite").exists()  # nothing submitted


def test_a_limit_below_one_is_refused(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["pipelines", "list", "--limit", "0"])
    assert exit.value.code == 2
    assert "--limit: must be at least 1, not 0" in capsys.readouterr().err
