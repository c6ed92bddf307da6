"""A local BigQuery for the tests: bqemulator in its own virtual environment.

bqemulator (a REST + gRPC BigQuery emulator on DuckDB) pins duckdb 1.5.5 while the project
uses duckdb 2.x, and installing it registers a pytest plugin that needs testcontainers; so
it never enters the project's venv. On first use this module builds a venv for it under
``.tools/bqemulator`` (gitignored) with ``python -m venv`` (which, unlike the project's uv
venv, has its own pip) and reuses it afterwards:

- ``bqemulator==1.4.0`` with ``duckdb==1.5.5`` and ``duckdb-extension-spatial==1.5.5``:
  the emulator loads DuckDB's spatial extension at start-up (``INSTALL spatial``) and
  would download it; the wheel ships the extension file. It is installed once from that
  file into a DuckDB home folder inside the venv (``home/.duckdb/extensions``), and the
  emulator runs with ``HOME`` pointing there, so ``INSTALL spatial`` finds it and nothing
  is downloaded.
- ``numpy``: bqemulator registers numpy-backed DuckDB functions at start-up but does not
  declare the dependency.

Also here: the ``bq_emulator`` session fixture, a fault-injecting proxy (``FaultProxy``)
for retry tests, and helpers to run dbt against the emulator.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.gcp.loopback import LoopbackServer

PROJECT_DIR = Path(__file__).resolve().parents[2]
TOOLS_DIR = PROJECT_DIR / ".tools" / "bqemulator"
REQUIREMENTS = (
    "bqemulator==1.4.0",
    "duckdb==1.5.5",
    "duckdb-extension-spatial==1.5.5",
    "numpy",
)
# The Google Cloud project the tests use; the emulator accepts any id.
PROJECT = "ml-platform-test"
LOCATION = "US"

# Installs the spatial extension from the wheel's file into the DuckDB home of the venv,
# then proves it loads without the network.
_INSTALL_SPATIAL = """
import pathlib, duckdb, duckdb_extension_spatial
root = pathlib.Path(duckdb_extension_spatial.__file__).parent
path = next(root.glob("extensions/*/spatial.duckdb_extension"))
duckdb.connect().execute(f"INSTALL '{path}'")
connection = duckdb.connect()
connection.execute("INSTALL spatial")
connection.execute("LOAD spatial")
"""


class EmulatorError(RuntimeError):
    """The emulator could not be installed or started; the message says why."""


# -- the emulator's own environment ---------------------------------------------------------


def _run(command: list[str], what: str, **kwargs) -> None:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        # pip prints a warning per unreachable extra index; keep the lines that matter.
        useful = [line for line in output if "is ignored: it is neither" not in line]
        raise EmulatorError(
            f"{what} failed (exit {result.returncode}): {' '.join(command)}\n"
            + "\n".join(useful[-25:])
        )


def _environment_stamp() -> dict[str, object]:
    return {"requirements": list(REQUIREMENTS), "python": platform.python_version()}


def _emulator_env(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BQEMU_")}
    # DuckDB's extension folder is $HOME/.duckdb/extensions: the one inside the venv.
    env["HOME"] = str(root / "home")
    env.pop("PYTHONPATH", None)
    return env


def ensure_environment(root: Path = TOOLS_DIR) -> Path:
    """The emulator's venv, built on first use (about 30 s) and reused afterwards."""
    stamp_file = root / "ready.json"

    def ready() -> bool:
        return (
            stamp_file.exists()
            and json.loads(stamp_file.read_text()) == _environment_stamp()
            and (root / "bin" / "bqemulator").exists()
        )

    if ready():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # Two test processes (or two engineers) must not build the same venv at once.
    with (root.parent / f".{root.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():
            return root
        shutil.rmtree(root, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(root)], "creating the bqemulator venv")
        python = str(root / "bin" / "python")
        _run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *REQUIREMENTS,
            ],
            "installing bqemulator (from PyPI)",
        )
        (root / "home").mkdir(exist_ok=True)
        _run(
            [python, "-c", _INSTALL_SPATIAL],
            "installing DuckDB's spatial extension from duckdb-extension-spatial",
            env=_emulator_env(root),
        )
        stamp_file.write_text(json.dumps(_environment_stamp()))
    return root


# -- the emulator process ------------------------------------------------------------------


@dataclass
class Emulator:
    endpoint: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def start_emulator(log_path: Path, *, timeout: float = 90.0) -> Emulator:
    """Start bqemulator on a free port of 127.0.0.1 (in memory) and wait until it is ready."""
    root = ensure_environment()
    env = _emulator_env(root)
    # Avro support would try to download another DuckDB extension: not needed here.
    env["BQEMU_ENABLE_FORMAT_EXTENSIONS"] = "false"
    command = [
        str(root / "bin" / "bqemulator"),
        "start",
        "--ephemeral",
        "--rest-host",
        "127.0.0.1",
        "--rest-port",
        "0",  # the emulator picks a free port and logs it
        "--grpc-port",
        "0",
        "--project",
        PROJECT,
        "--log-format",
        "json",
        "--log-level",
        "info",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    emulator = Emulator(endpoint="", process=process, log_path=log_path)
    deadline = time.monotonic() + timeout
    try:
        while not emulator.endpoint:
            if process.poll() is not None:
                raise EmulatorError(
                    f"bqemulator exited with {process.returncode} at start-up:\n"
                    + emulator.log_tail()
                )
            if time.monotonic() > deadline:
                raise EmulatorError(f"bqemulator did not start in {timeout:.0f} s")
            for line in log_path.read_text(errors="replace").splitlines():
                if '"rest.listen"' in line:
                    emulator.endpoint = f"http://127.0.0.1:{json.loads(line)['port']}"
            time.sleep(0.2)
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{emulator.endpoint}/readyz", timeout=2) as answer,
            ):
                if answer.status == 200:
                    return emulator
            if time.monotonic() > deadline or process.poll() is not None:
                raise EmulatorError(
                    f"bqemulator at {emulator.endpoint} never became ready:\n" + emulator.log_tail()
                )
            time.sleep(0.2)
    except BaseException:
        emulator.stop()
        raise


_EMULATOR_KEY = pytest.StashKey[Emulator]()


@pytest.fixture(scope="session")
def bq_emulator(request: pytest.FixtureRequest, tmp_path_factory) -> Emulator:
    """One emulator for the whole test session, stopped when the session ends.

    Test modules import this fixture; a fixture imported into two modules would be two
    fixtures, so the running emulator is kept in the session's stash and started once.
    """
    stash = request.config.stash
    if _EMULATOR_KEY not in stash:
        log = tmp_path_factory.mktemp("bqemulator") / "bqemulator.log"
        try:
            emulator = start_emulator(log)
        except EmulatorError as error:
            pytest.fail(f"the BigQuery emulator is not available: {error}", pytrace=False)
        stash[_EMULATOR_KEY] = emulator
        request.config.add_cleanup(emulator.stop)
    return stash[_EMULATOR_KEY]


def bigquery_warehouse(endpoint: str, *, retry_deadline: float = 5.0):
    """The project's BigQueryWarehouse on the emulator, with short retries."""
    from google.auth.credentials import AnonymousCredentials

    from ml_platform.resources.warehouse.bigquery import BigQueryWarehouse

    return BigQueryWarehouse(
        PROJECT,
        LOCATION,
        api_endpoint=endpoint,
        credentials=AnonymousCredentials(),
        retry_deadline=retry_deadline,
        request_timeout=30.0,
        job_timeout=120.0,
    )


# -- fault injection -----------------------------------------------------------------------


@dataclass
class Fault:
    """Answer the next ``times`` requests that match with ``status`` instead of forwarding."""

    method: str
    path: str  # a regular expression searched in the request path (with its query)
    status: int
    times: int
    reason: str | None = None  # BigQuery's error reason, when the error is structured
    message: str = "injected fault"
    body_contains: str | None = None
    injected: int = 0


@dataclass
class FaultProxy:
    """A small HTTP proxy in front of the emulator that fails chosen requests.

    Every request is forwarded as it is (with its Host header, so resumable upload
    locations point back at the proxy), except those matching an armed ``Fault``, which
    get a BigQuery-shaped error without reaching the emulator. ``requests`` records
    ``(method, path, status)`` of everything the proxy answered, ``authorizations`` the
    Authorization header of every request.
    """

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    _server: LoopbackServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return self._server.url

    def fail(self, method: str, path: str, status: int, *, times: int = 1, **kwargs) -> Fault:
        fault = Fault(method, path, status, times, **kwargs)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def _match(self, method: str, path: str, body: bytes) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if (
                    fault.injected < fault.times
                    and fault.method == method
                    and re.search(fault.path, path)
                    and (fault.body_contains is None or fault.body_contains.encode() in body)
                ):
                    fault.injected += 1
                    return fault
        return None

    def __enter__(self) -> FaultProxy:
        proxy = self
        host, _, port = self.upstream.removeprefix("http://").partition(":")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.authorizations.append(self.headers.get("Authorization"))
                fault = proxy._match(self.command, self.path, body)
                if fault is not None:
                    error: dict[str, object] = {"code": fault.status, "message": fault.message}
                    if fault.reason:
                        error["errors"] = [{"reason": fault.reason, "message": fault.message}]
                    self._answer(fault.status, json.dumps({"error": error}).encode(), {})
                    return
                upstream = HTTPConnection(host, int(port), timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                content = answer.read()
                skip = {"transfer-encoding", "connection", "content-length"}
                passed = {k: v for k, v in answer.getheaders() if k.lower() not in skip}
                upstream.close()
                self._answer(answer.status, content, passed)

            def _answer(self, status: int, content: bytes, headers: dict[str, str]) -> None:
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, status))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Type" not in headers and content:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server = LoopbackServer(Handler)
        return self

    def __exit__(self, *exc_info) -> None:
        assert self._server is not None
        self._server.close()


# -- no calls to Google --------------------------------------------------------------------


class Tripwire:
    """A local TCP listener that records every connection made to it.

    Used as the HTTP(S) proxy and metadata server of subprocesses that must not reach
    Google: anything that tries (a token refresh, Application Default Credentials probing
    the metadata server) lands here, fails at once, and is recorded in ``attempts``.
    """

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self.attempts: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # closed
                return
            with connection:
                connection.settimeout(2)
                try:
                    first_line = connection.recv(4096).split(b"\r\n", 1)[0]
                except OSError:
                    first_line = b""
                self.attempts.append(first_line.decode(errors="replace") or "(no request)")

    def env(self) -> dict[str, str]:
        return {
            "HTTPS_PROXY": f"http://{self.address}",
            "HTTP_PROXY": f"http://{self.address}",
            "NO_PROXY": "127.0.0.1,localhost",
            "GCE_METADATA_HOST": self.address,
            "GCE_METADATA_IP": self.address,
        }

    def close(self) -> None:
        self._socket.close()


# -- dbt -------------------------------------------------------------------------------------

DBT_PROJECT_DIR = PROJECT_DIR / "dbt_project"
DBT_EXECUTABLE = Path(sys.executable).parent / "dbt"
EMULATOR_TARGET = "emulator"
# The dummy token the emulator target sends; oauth-secrets with a token and no refresh token
# never asks Google for anything.
DUMMY_TOKEN = "emulator-dummy-token"


def write_emulator_profiles(profiles_dir: Path) -> Path:
    """A profiles.yml with the project's targets plus ``emulator``: the real ``branch``
    target (project, location, dataset and api_endpoint from --vars) with a dummy token
    instead of Application Default Credentials, and short retries (the emulator answers
    500 on SQL it does not support, which dbt-bigquery would otherwise retry for long)."""
    import yaml

    profiles = yaml.safe_load((DBT_PROJECT_DIR / "profiles.yml").read_text())
    outputs = profiles["ml_platform"]["outputs"]
    emulator = dict(outputs["branch"])
    emulator.update(
        method="oauth-secrets",
        token=DUMMY_TOKEN,
        threads=4,
        job_retries=0,
        job_retry_deadline_seconds=30,
        job_execution_timeout_seconds=300,
    )
    outputs[EMULATOR_TARGET] = emulator
    profiles_dir.mkdir(parents=True, exist_ok=True)
    path = profiles_dir / "profiles.yml"
    path.write_text(yaml.safe_dump(profiles, sort_keys=False))
    return path


@dataclass
class DbtRun:
    """One dbt command, running as a subprocess with its own target and log folders."""

    name: str
    process: subprocess.Popen
    log: Path
    command: list[str]

    def wait(self, timeout: float = 600) -> str:
        self.process.wait(timeout=timeout)
        output = self.log.read_text(errors="replace")
        if self.process.returncode != 0:
            failures = [
                line
                for line in output.splitlines()
                if re.search(r"error|fail|warn", line, re.IGNORECASE)
            ]
            raise AssertionError(
                f"dbt ({self.name}) failed with exit {self.process.returncode}: "
                f"{' '.join(self.command[1:4])}\n" + "\n".join(failures[-40:])
            )
        return output


def start_dbt(
    name: str,
    args: list[str],
    *,
    target: str,
    dbt_vars: dict[str, object],
    work_dir: Path,
    profiles_dir: Path | None = None,
    tripwire: Tripwire | None = None,
) -> DbtRun:
    """Start ``dbt ARGS`` on the project, writing only under ``work_dir``.

    With a ``tripwire``, every way out to Google goes to it instead (see ``Tripwire``).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(DBT_EXECUTABLE),
        *args,
        "--project-dir",
        str(DBT_PROJECT_DIR),
        "--target",
        target,
        "--target-path",
        str(work_dir / "target"),
        "--log-path",
        str(work_dir / "logs"),
        "--vars",
        json.dumps(dbt_vars),
    ]
    if profiles_dir is not None:
        command += ["--profiles-dir", str(profiles_dir)]
    env = dict(os.environ)
    env["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    if tripwire is not None:
        env.update(tripwire.env())
    log = work_dir / f"{name}.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=work_dir
        )
    return DbtRun(name, process, log, command)


@contextlib.contextmanager
def running(*runs: DbtRun) -> Iterator[tuple[DbtRun, ...]]:
    """Make sure no dbt subprocess outlives a failing test."""
    try:
        yield runs
    finally:
        for run in runs:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
