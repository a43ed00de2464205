"""The /metrics fast path in uvicorn's HTTP protocol: real sockets, real uvicorn and httptools,
a stub context and a stub ASGI app that records what reached it."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState as UvicornState

from headrace.api.context import ServerState
from headrace.api.fast_metrics import MetricsFastPathProtocol
from headrace.metrics.prometheus import CONTENT_TYPE

BODY = b'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine="0"} 0.0\n'


class StubContext:
    """What `metrics_body` reads from a ServerContext."""

    def __init__(self) -> None:
        self.state = ServerState.READY
        self.load_fraction = 1.0
        self.metrics = self
        self.fresh: list[bool] = []
        self.lifecycle: list[tuple[str, float]] = []

    def set_lifecycle(self, state: str, load_fraction: float) -> None:
        self.lifecycle.append((state, load_fraction))

    def exposition(self, fresh: bool) -> bytes:
        self.fresh.append(fresh)
        return BODY


class Served:
    def __init__(self) -> None:
        self.ctx = StubContext()
        self.asgi: list[tuple[str, str, bytes]] = []  # (method, path, query) that reached ASGI
        self.state = UvicornState()
        self.state.default_headers = [(b"server", b"uvicorn")]  # uvicorn's Server sets these

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.asgi.append((scope["method"], scope["path"], scope["query_string"]))
        body = b"asgi"
        await send(
            {"type": "http.response.start", "status": 200,
             "headers": [(b"content-length", str(len(body)).encode())]}
        )  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    async def start(self) -> int:
        config = uvicorn.Config(
            self.app,
            http=MetricsFastPathProtocol.for_context(self.ctx),  # type: ignore[arg-type]
            log_config=None,
            interface="asgi3",
        )
        config.load()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.state, app_state={}
            ),
            "127.0.0.1",
            0,
        )
        self.server = server
        return int(server.sockets[0].getsockname()[1])


async def read_response(
    reader: asyncio.StreamReader, head_only: bool = False
) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, *lines = head.split(b"\r\n")[:-2]
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    body = b"" if head_only else await reader.readexactly(int(headers[b"content-length"]))
    return status, headers, body


def run(test: Any) -> None:
    async def main() -> None:
        served = Served()
        port = await served.start()
        try:
            await test(served, *await asyncio.open_connection("127.0.0.1", port))
        finally:
            served.server.close()

    asyncio.run(main())


def test_scrapes_on_a_kept_alive_connection_never_reach_asgi() -> None:
    async def test(served: Served, reader: Any, writer: Any) -> None:
        for extra in (b"", b"Cache-Control: no-cache\r\n", b""):
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
            status, headers, body = await read_response(reader)
            assert status == b"HTTP/1.1 200 OK"
            assert headers[b"content-type"] == CONTENT_TYPE.encode()
            assert headers[b"server"] == b"uvicorn" and b"connection" not in headers
            assert body == BODY
        assert served.ctx.fresh == [False, True, False]
        assert served.ctx.lifecycle == [("ready", 1.0)] * 3
        assert served.asgi == [] and not served.state.tasks
        assert served.state.total_requests == 3
        writer.close()

    run(test)


def test_everything_else_goes_through_asgi_in_order() -> None:
    async def test(served: Served, reader: Any, writer: Any) -> None:
        # Pipelined in one write, answered in order. A scrape behind a request still in
        # flight waits its turn in uvicorn's queue (ASGI path) rather than overtake it.
        writer.write(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /metrics?name=x HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        bodies = [(await read_response(reader))[2] for _ in range(4)]
        assert bodies == [BODY, b"asgi", b"asgi", b"asgi"]
        writer.write(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader, head_only=True))[1][b"content-length"] == b"4"
        assert served.asgi == [
            ("GET", "/metrics", b"name=x"), ("GET", "/health", b""), ("GET", "/metrics", b""),
            ("HEAD", "/metrics", b""),
        ]  # fmt: skip
        writer.close()

    run(test)


def test_http_1_0_and_connection_close_end_the_connection() -> None:
    for request in (
        b"GET /metrics HTTP/1.0\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ):

        async def test(served: Served, reader: Any, writer: Any, request: bytes = request) -> None:
            writer.write(request)
            _, headers, body = await read_response(reader)
            assert headers[b"connection"] == b"close" and body == BODY
            assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it

        run(test)
