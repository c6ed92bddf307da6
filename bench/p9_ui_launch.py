"""P9: one day of predictions launched as the UI launches it, against `dg dev` (`make dev`):
from the launch request to the run's success, beside the pipeline job's own duration.

The data folder is prepared first (ingest, features, a champion model, on the full data);
then `dg dev` serves it, and each round posts the UI's own GraphQL mutation for one
partition of flight_delay_predictions (the "Materialize" button's), polls the run until it
succeeds, and reads the pipeline job the run started from the job store: its duration from
submission to end is the work itself; the rest is Dagster's (queue, run worker, step).

    uv run python bench/p9_ui_launch.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from statistics import median

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREPARE = """
import dagster as dg
from ml_platform.definitions import defs
with dg.DagsterInstance.get() as instance:
    assert defs.resolve_job_def("train_flight_delay_model").execute_in_process(
        instance=instance
    ).success
"""
# What the launch dialog sends for one partition of one asset (no job: the asset job).
LAUNCH = """mutation Launch($params: ExecutionParams!) { launchPipelineExecution(
    executionParams: $params) { __typename ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message } ... on Error { message } } }"""
RUN = """query Run($id: ID!) { runOrError(runId: $id) { __typename ... on Run {
    status creationTime startTime endTime } } }"""


def graphql(url: str, query: str, **variables) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.load(response)
    if body.get("errors"):
        raise SystemExit(f"GraphQL errors: {body['errors']}")
    return body["data"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_served(url: str, process: subprocess.Popen, log: Path) -> None:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"dg dev exited; see {log}")
        try:
            entries = graphql(url, query)["workspaceOrError"]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"dg dev did not serve the code location in 300 s; see {log}")


def launch_and_wait(url: str, day: str) -> tuple[str, float, dict]:
    params = {
        "selector": {
            "repositoryLocationName": "ml_platform",
            "repositoryName": "__repository__",
            "pipelineName": "__ASSET_JOB",
            "assetSelection": [{"path": ["flight_delay_predictions"]}],
        },
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": day}]},
        "mode": "default",
    }
    started = time.monotonic()
    launched = graphql(url, LAUNCH, params=params)["launchPipelineExecution"]
    if launched["__typename"] != "LaunchRunSuccess":
        raise SystemExit(f"launch failed: {launched}")
    run_id = launched["run"]["runId"]
    while True:
        run = graphql(url, RUN, id=run_id)["runOrError"]
        if run["status"] == "SUCCESS":
            return run_id, time.monotonic() - started, run
        if run["status"] in ("FAILURE", "CANCELED"):
            raise SystemExit(f"run {run_id} of {day} ended {run['status']}")
        time.sleep(0.1)


def job_seconds(store: Path, run_id: str) -> float:
    """The pipeline job the run started: from its submission to its end."""
    with sqlite3.connect(store) as db:
        (created, ended) = db.execute(
            "SELECT create_time, end_time FROM pipeline_jobs "
            "WHERE json_extract(labels, '$.dagster_run_id') = ?",
            [run_id],
        ).fetchone()
    return ended - created


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="p9-"))
    (root / "home").mkdir()
    (root / "home" / "dagster.yaml").write_text(
        (PROJECT / "dagster_home" / "dagster.yaml").read_text()
    )
    env = {
        **os.environ,
        "ML_PLATFORM_DATA_DIR": str(root / "data"),
        "DAGSTER_HOME": str(root / "home"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    subprocess.run([sys.executable, "-c", PREPARE], env=env, cwd=PROJECT, check=True)
    port, log = free_port(), root / "dg-dev.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [str(BIN / "dg"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=PROJECT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its whole tree is stopped with one signal
        )
    url = f"http://127.0.0.1:{port}"
    samples = []
    try:
        wait_until_served(url, server, log)
        for i in range(args.rounds):
            day = f"2013-10-{i + 1:02d}"
            run_id, seconds, run = launch_and_wait(url, day)
            job = job_seconds(root / "data" / "pipeline_jobs.sqlite", run_id)
            samples.append((seconds, job, run["startTime"] - run["creationTime"]))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    ui, job, queued = (median(column) for column in zip(*samples, strict=True))
    print(f"P9 one day of predictions launched from the UI, median of {args.rounds} days")
    print(f"  launch -> run success     {ui:6.2f} s")
    print(f"    of which queued -> started (queue, run worker)  {queued:6.2f} s")
    print(f"  the pipeline job itself   {job:6.2f} s (submission to end)")
    print(f"  ratio {ui / job:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
