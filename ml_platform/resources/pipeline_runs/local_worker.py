"""Runs one recorded pipeline job with kfp.local; started by ``LocalPipelineRunner.submit``.

    python -m ml_platform.resources.pipeline_runs.local_worker STORE_PATH JOB_ID

It records RUNNING, runs the job's compiled template (the exact resolved version),
and records SUCCEEDED with the pipeline's outputs or FAILED with the failing task's error.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ml_platform.resources.pipeline_runs import JobState
from ml_platform.resources.pipeline_runs.local import JobStore

# The last exception line a failing component printed, e.g. "ValueError: cannot read ...".
_EXCEPTION_LINE = re.compile(r"^\s*((?:[A-Za-z_][\w.]*)(?:Error|Exception)): (.+)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _output_value(value: Any) -> Any:
    if hasattr(value, "uri"):  # a kfp artifact
        return {
            "uri": value.uri,
            "type": getattr(value, "schema_title", type(value).__name__),
            "metadata": dict(value.metadata or {}),
        }
    return value


def run_template(template_path: Path, parameters: dict[str, Any], pipeline_root: Path) -> dict:
    from kfp import components, local

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
    )
    pipeline = components.load_component_from_file(str(template_path))
    task = pipeline(**parameters)
    return {name: _output_value(value) for name, value in task.outputs.items()}


def failure_message(error: BaseException, log_path: Path) -> str:
    """kfp.local only says which task failed; the component's own exception is in the log."""
    summary = _ANSI.sub("", str(error))
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        match = _EXCEPTION_LINE.match(_ANSI.sub("", line))
        if match:
            return f"{summary} {match.group(1)}: {match.group(2)}"
    return summary


def main(argv: list[str]) -> int:
    # A worker lives in a session of its own, with no terminal: a SIGHUP is someone ending it
    # on purpose, even when the command that started it ran under nohup (whose SIG_IGN every
    # child would otherwise inherit, and the job would outlive the kill).
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    store_path, job_id = argv
    store = JobStore(store_path)
    row = store.row(job_id)
    if row is None:
        print(f"no pipeline job {job_id} in {store_path}", file=sys.stderr)
        return 2
    started = store.update(
        job_id,
        only_from=[JobState.QUEUED],
        state=str(JobState.RUNNING),
        start_time=time.time(),
        pid=os.getpid(),  # also known if the submitting process died before recording it
    )
    if not started:  # cancelled before it started
        return 0
    try:
        outputs = run_template(
            Path(row["template_path"]), json.loads(row["parameters"]), Path(row["pipeline_root"])
        )
    except Exception as error:
        sys.stdout.flush()
        store.update(
            job_id,
            only_from=[JobState.RUNNING],
            state=str(JobState.FAILED),
            end_time=time.time(),
            error=failure_message(error, Path(row["log_path"])),
        )
        return 1
    store.update(
        job_id,
        only_from=[JobState.RUNNING],
        state=str(JobState.SUCCEEDED),
        end_time=time.time(),
        outputs=json.dumps(outputs, default=str),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
