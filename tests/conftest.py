"""Shared fixtures. No model hub is reachable: everything loads from local files."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e.server import ServerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# One shared float32 server for the end-to-end tests that need no special flags.
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", "2048", "--num-kv-blocks", "1024")


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess(*SERVER_ARGS)
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, f"launcher exited with {code}:\n{srv.log_tail()}"
