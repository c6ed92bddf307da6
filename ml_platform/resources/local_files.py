"""Files the local backends write: templates, tags, a job's copy of its template, and the
SQLite stores of pipeline jobs and model versions."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path


def write_atomically(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` all at once or not at all: readers see the old file or
    the new one, and a full disk or a read-only folder leaves no half-written file behind.
    The error names the path (an OSError from a write alone does not)."""
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_bytes(content)
        os.replace(scratch, path)
    except OSError as error:
        scratch.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from error


class SqliteFile:
    """One SQLite file several processes share, with its schema: made on first use (so
    building the Definitions touches no file) and made again if deleted under a running
    process (a code server's sensor would otherwise fail every tick)."""

    def __init__(self, path: str | Path, schema: str, error: type[Exception], what: str) -> None:
        self.path = Path(path)
        self.schema = schema
        self.error = error  # raised, naming ``what`` and the file, for any SQLite or OS error
        self.what = what
        self._ready = False

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        ready = self._ready and self.path.exists()
        try:
            if not ready:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(sqlite3.connect(self.path, timeout=60, isolation_level=None)) as db:
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA busy_timeout=60000")
                if not ready:
                    _use_wal(db)
                    db.executescript(self.schema)
                    self._ready = True
                yield db
        except sqlite3.IntegrityError:
            raise  # a key taken: the caller's to say
        except (sqlite3.Error, OSError) as error:
            raise self.error(f"the {self.what} {self.path} cannot be used: {error}") from error


def _use_wal(db: sqlite3.Connection, patience: float = 60.0) -> None:
    """Switch the file to WAL (readers never block the writer). Switching needs the file to
    itself: SQLite answers "database is locked" at once, without its busy timeout, while
    another process opens a new file at the same moment, so wait for a turn here."""
    deadline = time.monotonic() + patience
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
