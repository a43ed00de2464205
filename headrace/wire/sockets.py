"""Where every process's sockets live, built in one place (the launcher) and handed to children.

Each API server binds two IPC endpoints; every engine connects to every API server (all-to-all):

    API server i                         engine e (identity b"engine-<e>")
      ROUTER  input_address(i)   <----   DEALER   requests in; READY / loading progress out
      PULL    output_address(i)  <----   PUSH     one EngineCoreOutputs per step
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Addresses:
    """IPC endpoints for `num_api_servers` frontends, under one private directory."""

    directory: str
    num_api_servers: int

    @classmethod
    def create(cls, num_api_servers: int) -> Addresses:
        return cls(tempfile.mkdtemp(prefix="headrace-ipc-"), num_api_servers)

    def input_address(self, api_index: int) -> str:
        return f"ipc://{os.path.join(self.directory, f'api{api_index}-in')}"

    def output_address(self, api_index: int) -> str:
        return f"ipc://{os.path.join(self.directory, f'api{api_index}-out')}"

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def engine_identity(engine_index: int) -> bytes:
    """The ZMQ routing id of an engine's DEALER socket."""
    return f"engine-{engine_index}".encode()
