"""Run a command and report its wall time and peak RSS (the largest process in its tree)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import median


@dataclass(frozen=True)
class Sample:
    seconds: float
    peak_rss_mb: float


def measure(command: Sequence[str], env: Mapping[str, str] | None = None) -> Sample:
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=None if env is None else {**os.environ, **env}, stdout=subprocess.DEVNULL
    )
    # wait4 reports this child's resource use (with its waited-for descendants), so samples
    # of one run never mix with another's.
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {process.returncode}")
    return Sample(seconds, usage.ru_maxrss / 1024)


def summary(samples: Sequence[Sample]) -> Sample:
    return Sample(median(s.seconds for s in samples), median(s.peak_rss_mb for s in samples))
