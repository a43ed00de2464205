"""Limits a public endpoint needs, kept in uvicorn's httptools protocol (before any ASGI task).

- A request's line and headers must arrive within `HEADER_TIMEOUT_S` of its first byte (or of
  the connection opening): a slowloris client gets 408 and is closed. No task or worker was
  spent on it, as no ASGI task starts before the headers are complete.
- At most `MAX_HEADERS` headers of at most `MAX_HEADER_BYTES` together (431), and a request
  target of at most `MAX_URL_BYTES` (414). llhttp has no such limits of its own.
- Every refusal here, and uvicorn's own 400 for an unparsable request, is an OpenAI error body.
Bodies are capped in size and time by `GuardMiddleware` (`api/app.py`).
"""

from __future__ import annotations

import asyncio

import msgspec
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from headrace.api.errors import error_body

HEADER_TIMEOUT_S = 10.0
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 << 10
MAX_URL_BYTES = 16 << 10


class _RefusedError(Exception):
    """Raised in a parser callback: the request is refused with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header timeouts and caps."""

    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0  # of the headers parsed so far
    _head_bytes = 0  # received since the request began, while its headers are incomplete
    _refusal: _RefusedError | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is not None and not self.transport.is_closing():
            # still within a request's line and headers after this chunk: a header line that
            # never ends would otherwise grow in the parser's buffer until the timeout
            self._head_bytes += len(data)
            if self._head_bytes > MAX_URL_BYTES + MAX_HEADER_BYTES + 1024:
                self.send_error(
                    431, f"The request headers are larger than {MAX_HEADER_BYTES} bytes"
                )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = self._head_bytes = 0
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_URL_BYTES:
            self._refuse(414, f"The request target is longer than {MAX_URL_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value)
        if len(self.headers) > MAX_HEADERS:
            self._refuse(431, f"The request has more than {MAX_HEADERS} headers")
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(431, f"The request headers are larger than {MAX_HEADER_BYTES} bytes")

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this when the parser fails, our callbacks' refusals included."""
        refusal, self._refusal = self._refusal, None
        if refusal is not None:
            self.send_error(refusal.status, refusal.message)
        else:
            self.send_error(400, f"{msg.rstrip('.')}: the request could not be parsed")

    def send_error(self, status: int, message: str) -> None:
        """An OpenAI error response, then close the connection (the parser is past recovery)."""
        self._cancel_header_timer()
        if self.transport.is_closing():
            return
        body = msgspec.json.encode(error_body(status, message))
        out = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            out += [name, b": ", value, b"\r\n"]
        out += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(out))
        self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        self._refusal = _RefusedError(status, message)
        raise self._refusal  # the parser stops; uvicorn answers through send_400_response

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:  # still waiting for headers
            message = f"The request headers did not arrive within {HEADER_TIMEOUT_S:g} s"
            self.send_error(408, message)
