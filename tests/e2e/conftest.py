"""One shared float32 server for the end-to-end tests that need no special flags."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.server import ServerProcess

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
