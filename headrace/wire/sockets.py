"""Where every process's sockets live, built in one place (the launcher) and handed to children.

Each API server binds two endpoints; every engine connects to every API server (all-to-all). With
several engines a coordinator binds two more:

    API server i                         engine e (identity b"engine-<e>", e = global rank)
      ROUTER  api_inputs[i]      <----   DEALER   requests in; READY / loading progress out
      PULL    api_outputs[i]     <----   PUSH     one EngineCoreOutputs per step
    coordinator
      PULL    coordinator_input  <----   PUSH     EngineLoad on change and as a heartbeat
      PUB     coordinator_publish ---->  SUB (every API server)  LoadVector
      ROUTER  registration       <----   DEALER (headless nodes' launchers)  NodeHello

On one machine the endpoints are IPC paths in a private directory. When some ranks run on other
machines they are TCP ports on `--data-parallel-address` (bound on that address, connected to by
name), and the registration port is `--data-parallel-rpc-port`.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Addresses:
    """Endpoints of one serving topology. `bind(x)` is what the owner binds for endpoint x."""

    api_inputs: tuple[str, ...]
    api_outputs: tuple[str, ...]
    coordinator_input: str | None = None
    coordinator_publish: str | None = None
    registration: str | None = None
    directory: str | None = None  # the IPC directory to remove at the end
    bind_host: str | None = None  # TCP endpoints are bound on this address

    @property
    def num_api_servers(self) -> int:
        return len(self.api_inputs)

    @classmethod
    def local(cls, num_api_servers: int, coordinator: bool) -> Addresses:
        """IPC endpoints under a private directory (every process on this machine)."""
        directory = tempfile.mkdtemp(prefix="headrace-ipc-")

        def ipc(name: str) -> str:
            return f"ipc://{os.path.join(directory, name)}"

        return cls(
            api_inputs=tuple(ipc(f"api{i}-in") for i in range(num_api_servers)),
            api_outputs=tuple(ipc(f"api{i}-out") for i in range(num_api_servers)),
            coordinator_input=ipc("coord-in") if coordinator else None,
            coordinator_publish=ipc("coord-pub") if coordinator else None,
            directory=directory,
        )

    @classmethod
    def tcp(cls, host: str, rpc_port: int, num_api_servers: int) -> Addresses:
        """TCP endpoints on `host`, reachable from other machines: the registration socket on
        `rpc_port`, every other endpoint on a free port of that address."""
        ip = resolve(host)
        ports = free_ports(ip, 2 * num_api_servers + 2)

        def at(port: int) -> str:
            return f"tcp://{_url_host(host)}:{port}"

        n = num_api_servers
        return cls(
            api_inputs=tuple(at(p) for p in ports[:n]),
            api_outputs=tuple(at(p) for p in ports[n : 2 * n]),
            coordinator_input=at(ports[2 * n]),
            coordinator_publish=at(ports[2 * n + 1]),
            registration=at(rpc_port),
            bind_host=ip,
        )

    def bind(self, endpoint: str) -> str:
        """The address to bind for `endpoint`: IPC as is; TCP on the resolved interface."""
        if self.bind_host is None or not endpoint.startswith("tcp://"):
            return endpoint
        port = endpoint.rsplit(":", 1)[1]
        return f"tcp://{_url_host(self.bind_host)}:{port}"

    def cleanup(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def resolve(host: str) -> str:
    """The IP address `host` names (as given if it is one)."""
    return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])


def free_ports(ip: str, count: int) -> list[int]:
    """`count` distinct ports that are free on `ip` now (held open together while chosen)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    held = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((ip, 0))
            held.append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def engine_identity(engine_index: int) -> bytes:
    """The ZMQ routing id of an engine's DEALER socket."""
    return f"engine-{engine_index}".encode()
