"""P3: a completion-sensor tick with nothing new, against 10 and against 10,000 past jobs.

The sensor is the real one (``build_definitions(settings)``), evaluated with
``dg.build_sensor_context`` on a temporary Dagster instance, with the pipeline runner
``backends.py`` builds, on two backends:

- local: ``LocalPipelineRunner`` on a SQLite job store; SQL statements are counted with
  sqlite3's ``set_trace_callback`` on the store's connections (plus the one
  ``PRAGMA busy_timeout`` each connection runs before it is handed out), and calls at the
  ``PipelineRunner`` interface (``list_jobs``, ``get``) are counted too;
- Vertex: ``VertexPipelineRunner.from_settings`` (a branch deployment), whose real GAPIC
  REST client talks to the tests' fake Vertex server (tests/gcp/fake_vertex.py); API calls
  are the HTTP requests the fake received, and the time the fake spent answering them is
  measured apart, because its listing is a linear scan in Python where Vertex filters on
  its side.

Each store holds N past jobs (N = 10 or 10,000) of this deployment that ended before the
lookback window, plus ``--in-window`` jobs inside the window; the cursor (the sensor's own
``Cursor``) says every one was handled, so the tick under measurement has nothing new. The
four configurations alternate tick by tick in one run, in a random order each round (the
machine is noisy); the figures are medians and the 10,000 / 10 ratio. Goals: ratio <= 1.2
and <= 2 API calls per tick. A last section shows what the calls per tick do depend on: the
handled jobs inside the window. ``--profile`` prints where the time of a 10,000-job tick
goes (the sensor's thread, and the fake server's).

    uv run python bench/p3_sensor_tick.py [--rounds 101] [--in-window 20] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import logging
import pstats
import random
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))  # for tests.gcp.fake_vertex

import dagster as dg  # noqa: E402

from ml_platform.definitions import build_definitions  # noqa: E402
from ml_platform.resources.pipeline_runs.local import JobStore, LocalPipelineRunner  # noqa: E402
from ml_platform.resources.pipeline_runs.vertex import VertexPipelineRunner  # noqa: E402
from ml_platform.resources.templates.local import LocalTemplateRegistry  # noqa: E402
from ml_platform.sensors import SENSOR_NAME, Cursor  # noqa: E402
from ml_platform.settings import Settings  # noqa: E402
from tests.gcp.fake_vertex import FakeVertex  # noqa: E402

SIZES = (10, 10_000)
RATIO_GOAL = 1.2
CALLS_GOAL = 2
PR = "1187"
PIPELINE = "flight-delay-prediction"
ASSET = "flight_delay_predictions"


# -- instruments ----------------------------------------------------------------------------


class TracedJobStore(JobStore):
    """The job store, with every SQL statement run on its connections recorded."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.statements: list[str] = []
        self.connections = 0  # each also ran `PRAGMA busy_timeout` before being handed out

    @contextmanager
    def _connect(self) -> Iterator[Any]:
        with super()._connect() as db:
            self.connections += 1
            db.set_trace_callback(self.statements.append)
            try:
                yield db
            finally:
                db.set_trace_callback(None)


class CountedLocalRunner(LocalPipelineRunner):
    """The local runner, counting calls at the PipelineRunner interface."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.interface: Counter[str] = Counter()

    def list_jobs(self, **kwargs: Any):
        self.interface["list_jobs"] += 1
        return super().list_jobs(**kwargs)

    def get(self, job_id: str):
        self.interface["get"] += 1
        return super().get(job_id)


class TimedVertex(FakeVertex):
    """The tests' fake Vertex, with the time it spends answering added up."""

    server_seconds = 0.0
    profiler: cProfile.Profile | None = None  # set to profile the fake's side

    def handle(self, method: str, target: str, raw_body: bytes) -> tuple[int, dict[str, Any]]:
        started = time.perf_counter()
        try:
            if self.profiler is not None:
                return self.profiler.runcall(super().handle, method, target, raw_body)
            return super().handle(method, target, raw_body)
        finally:
            self.server_seconds += time.perf_counter() - started


# -- the jobs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class History:
    """When jobs ended: ``past`` before the lookback window, ``recent`` inside it."""

    newest_end: float
    lookback: float
    past: int
    recent: int

    def past_ends(self) -> Iterator[tuple[str, float]]:
        horizon = self.newest_end - self.lookback
        for i in range(self.past):  # one a minute, going back from the window's start
            yield f"job-past-{i:05d}", horizon - 60.0 * (i + 1)

    def recent_ends(self) -> Iterator[tuple[str, float]]:
        step = self.lookback * 0.9 / max(self.recent, 1)
        for i in range(self.recent):
            yield f"job-recent-{i:05d}", self.newest_end - step * i

    def cursor(self) -> str:
        """What the sensor's cursor says after handling every one of them."""
        return Cursor(newest_end=self.newest_end, handled=dict(self.recent_ends())).dump()

    def jobs(self) -> Iterator[tuple[str, str, float]]:
        for i, (job_id, ended) in enumerate([*self.past_ends(), *self.recent_ends()]):
            yield (
                job_id,
                ("SUCCEEDED", "SUCCEEDED", "SUCCEEDED", "FAILED", "CANCELLED")[i % 5],
                ended,
            )


def fill_job_store(store: JobStore, settings: Settings, history: History) -> None:
    rows = []
    for job_id, state, ended in history.jobs():
        labels = settings.job_labels(asset=ASSET, partition="2013-10-01", run_id=None)
        rows.append(
            {
                "job_id": job_id,
                "pipeline": PIPELINE,
                "display_name": job_id,
                "state": f"PIPELINE_STATE_{state}",
                "labels": json.dumps(labels, sort_keys=True),
                "create_time": ended - 600,
                "start_time": ended - 590,
                "end_time": ended,
                "update_time": ended,
                "template_uri": "/templates/x.yaml",
                "template_version": "sha256:0123",
                "template_path": "/templates/x.yaml",
                "parameters": json.dumps({"flight_date": "2013-10-01"}),
                "outputs": json.dumps({"rows": 950} if state == "SUCCEEDED" else {}),
                "error": None if state == "SUCCEEDED" else f"task score-flights: {state.lower()}",
                "pipeline_root": "/root",
                "log_path": f"/root/{job_id}/job.log",
            }
        )
    columns = list(rows[0])
    # One transaction: a connection per insert (JobStore.insert) would take minutes.
    with store._connect() as db:
        db.execute("BEGIN")
        db.executemany(
            f"INSERT INTO pipeline_jobs ({', '.join(columns)}) "
            f"VALUES ({', '.join(':' + c for c in columns)})",
            rows,
        )
        db.execute("COMMIT")


def fill_vertex(vertex: FakeVertex, settings: Settings, history: History) -> None:
    labels = settings.job_labels(asset=ASSET, partition="2013-10-01", run_id=None)
    for job_id, state, ended in history.jobs():
        vertex.add_job(
            job_id,
            state=state,
            labels=labels,
            created=ended - 600,
            ended=ended,
            pipeline=PIPELINE,
        )


# -- one configuration ----------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    calls: Counter[str]
    server_seconds: float = 0.0


@dataclass
class Config:
    backend: str  # "local" or "Vertex"
    past: int
    tick: Callable[[], Sample]
    vertex: TimedVertex | None = None
    samples: list[Sample] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.past:,} past jobs"


def sensor_tick(
    defs: dg.Definitions, instance: dg.DagsterInstance, runner: Any, cursor: str
) -> Callable[[], float]:
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    resources = {
        "pipeline_runner": runner,
        "artifacts": defs.resources["artifacts"],
        "alerts": defs.resources["alerts"],
    }

    def tick() -> float:
        started = time.perf_counter()
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources=resources, definitions=defs
        )
        result = sensor.evaluate_tick(context)
        seconds = time.perf_counter() - started
        if result.run_requests or result.asset_events or result.cursor != cursor:
            raise SystemExit(f"the tick found something new: {result}")
        return seconds

    return tick


def local_config(
    root: Path, instance: dg.DagsterInstance, past: int, recent: int, now: float
) -> Config:
    settings = Settings.from_env(
        {"ML_PLATFORM_DATA_DIR": str(root / "data"), "DAGSTER_HOME": str(root / "home")}
    )
    history = History(now - 120, settings.sensor_lookback_seconds, past, recent)
    store = TracedJobStore(settings.job_store_path)
    fill_job_store(store, settings, history)
    # backends.py's runner (counted at its interface), on the traced store.
    templates = LocalTemplateRegistry(settings.template_dir)
    runner = CountedLocalRunner(settings.job_store_path, settings.pipeline_root, templates)
    runner.store = store
    timed = sensor_tick(build_definitions(settings), instance, runner, history.cursor())

    def tick() -> Sample:
        store.statements.clear()
        store.connections = 0
        runner.interface.clear()
        seconds = timed()
        calls = Counter(statement.split()[0].upper() for statement in store.statements)
        calls["PRAGMA"] += store.connections
        calls.update({f"runner.{name}": n for name, n in runner.interface.items()})
        return Sample(seconds, calls)

    return Config("local", past, tick)


def branch_settings(vertex: FakeVertex, root: Path) -> Settings:
    return Settings.from_env(
        {
            "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT": "1",
            "DAGSTER_CLOUD_PULL_REQUEST_ID": PR,
            "ML_PLATFORM_GCP_PROJECT": vertex.project,
            "ML_PLATFORM_GCP_REGION": vertex.location,
            "ML_PLATFORM_GCS_BUCKET": "acme-ml-pipelines",
            "ML_PLATFORM_ARTIFACT_REGISTRY_REPOSITORY": "pipeline-templates",
            "ML_PLATFORM_VERTEX_API_ENDPOINT": vertex.url,
            "ML_PLATFORM_DATA_DIR": str(root / "data"),
            "DAGSTER_HOME": str(root / "home"),
        }
    )


def vertex_config(
    root: Path,
    instance: dg.DagsterInstance,
    vertex: TimedVertex,
    past: int,
    recent: int,
    now: float,
) -> Config:
    settings = branch_settings(vertex, root)
    history = History(now - 120, settings.sensor_lookback_seconds, past, recent)
    fill_vertex(vertex, settings, history)
    # backends.py: VertexPipelineRunner.from_settings; the sensor never submits, so any
    # template registry will do. A plain-http endpoint makes it go anonymous by itself.
    runner = VertexPipelineRunner.from_settings(settings, LocalTemplateRegistry(root / "t"))
    timed = sensor_tick(build_definitions(settings), instance, runner, history.cursor())

    def tick() -> Sample:
        before, server = len(vertex.requests), vertex.server_seconds
        seconds = timed()
        calls = Counter(request.kind for request in vertex.requests[before:])
        return Sample(seconds, calls, vertex.server_seconds - server)

    return Config("Vertex", past, tick, vertex)


# -- reporting ------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f} ms"


def meets(ok: bool) -> str:
    return "meets" if ok else "misses"


def calls_text(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "none"


def typical_calls(config: Config) -> Counter[str]:
    # Every tick of a configuration makes the same calls; say so if one did not.
    seen = {tuple(sorted(sample.calls.items())) for sample in config.samples}
    if len(seen) != 1:
        raise SystemExit(f"{config.label}: calls differ between ticks: {seen}")
    return config.samples[0].calls


def api_calls(config: Config) -> int:
    calls = typical_calls(config)
    if config.backend == "Vertex":
        return sum(calls.values())
    return calls["SELECT"]  # the queries; the PRAGMA is the connection's set-up


def top(profiler: cProfile.Profile, lines: int = 16) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(lines)
    return out.getvalue().strip()


def profile(config: Config, ticks: int = 20) -> str:
    """Where the time of ``ticks`` ticks goes: the sensor's thread, and the fake's."""
    profiler = cProfile.Profile()
    if config.vertex is not None:
        config.vertex.profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(ticks):
        config.tick()
    profiler.disable()
    text = f"--- {config.label}, {ticks} ticks: the sensor's thread ---\n{top(profiler)}"
    if config.vertex is not None:
        text += f"\n--- the fake Vertex server answering them ---\n{top(config.vertex.profiler)}"
        config.vertex.profiler = None
    return text


def calls_against_window(root: Path, instance: dg.DagsterInstance, now: float) -> list[str]:
    """API calls of a tick with nothing new, as the handled jobs inside the window grow."""
    lines = []
    for recent in (99, 150, 250, 1000):
        with TimedVertex() as vertex:
            config = vertex_config(root / f"w{recent}", instance, vertex, 10, recent, now)
            config.tick()  # the first tick makes the client
            sample = config.tick()
            lines.append(
                f"    {recent:5,} handled jobs in the window: {calls_text(sample.calls):<9} "
                f"{ms(sample.seconds)}"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--in-window", type=int, default=20, help="handled jobs in the window")
    parser.add_argument("--profile", action="store_true", help="profile the 10,000-job ticks")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    now = time.time()
    with (
        tempfile.TemporaryDirectory() as scratch,
        dg.instance_for_test() as instance,
        TimedVertex() as small,
        TimedVertex() as large,
    ):
        root = Path(scratch)
        built = time.perf_counter()
        configs = [
            local_config(root / "local-small", instance, SIZES[0], args.in_window, now),
            local_config(root / "local-large", instance, SIZES[1], args.in_window, now),
            vertex_config(root / "vertex-small", instance, small, SIZES[0], args.in_window, now),
            vertex_config(root / "vertex-large", instance, large, SIZES[1], args.in_window, now),
        ]
        built = time.perf_counter() - built
        for config in configs:  # warm up: the GAPIC client, imports, SQLite's schema check
            for _ in range(3):
                config.tick()
        # The fakes' jobs live in this process's heap, where Vertex's would not: keep them
        # out of the garbage collector's way (a collection during a tick would scan them).
        gc.collect()
        gc.freeze()
        rng = random.Random(20131001)
        for _ in range(args.rounds):
            # Tick by tick, in a new random order every round, so that no configuration
            # always follows the same one (a 10,000-job listing leaves the CPU caches cold).
            order = configs[:]
            rng.shuffle(order)
            for config in order:
                config.samples.append(config.tick())
        gc.unfreeze()
        window = calls_against_window(root, instance, now)
        large = [config for config in configs if config.past == SIZES[1]]
        profiles = [profile(config) for config in large] if args.profile else []

    lookback = Settings.sensor_lookback_seconds
    print(
        f"P3 completion-sensor tick with nothing new: median of {args.rounds} alternating "
        f"rounds; {args.in_window} handled jobs inside the {lookback} s lookback window, "
        f"past jobs before it (set up in {built:.0f} s)"
    )
    verdicts = []
    for backend in ("local", "Vertex"):
        small_config, large_config = (c for c in configs if c.backend == backend)
        medians = {}
        for config in (small_config, large_config):
            seconds = median(s.seconds for s in config.samples)
            medians[config.past] = seconds
            extra = ""
            if backend == "Vertex":
                server = median(s.server_seconds for s in config.samples)
                medians[(config.past, "ours")] = median(
                    s.seconds - s.server_seconds for s in config.samples
                )
                extra = f"  (fake server {ms(server).strip()})"
            print(
                f"  {backend:<6} {config.past:6,} past jobs  tick {ms(seconds)}{extra}  "
                f"calls per tick: {calls_text(typical_calls(config))}"
            )
        ratio = medians[SIZES[1]] / medians[SIZES[0]]
        calls = max(api_calls(small_config), api_calls(large_config))
        line = f"    ratio 10,000 / 10: {ratio:.2f}x"
        verdict = (
            f"{backend}: time {ratio:.2f}x {meets(ratio <= RATIO_GOAL)} the goal <= {RATIO_GOAL}"
        )
        if backend == "Vertex":
            ours = medians[(SIZES[1], "ours")] / medians[(SIZES[0], "ours")]
            line += f"; without the fake server's time {ours:.2f}x"
            verdict += f" (the fake's listing included; {ours:.2f}x without it)"
        print(line)
        what = "SQL queries" if backend == "local" else "API calls"
        verdicts.append(
            f"{verdict}; {calls} {what} per tick {meets(calls <= CALLS_GOAL)} the goal "
            f"<= {CALLS_GOAL}"
        )
    for verdict in verdicts:
        print(f"  {verdict}")
    print("  Vertex API calls of a tick with nothing new, by handled jobs inside the window")
    print("  (10 past jobs; list pages of 100):")
    for line in window:
        print(line)
    if args.profile:
        for text in profiles:
            print(f"\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
