"""Files the local backends write (templates, tags, a job's copy of its template)."""

from __future__ import annotations

import os
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
