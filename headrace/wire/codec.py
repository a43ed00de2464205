"""msgpack encoding of wire messages; one encoder/decoder per direction, reused (they are cheap
to call and allocation-free when reused)."""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

from headrace.wire.messages import EngineInput, EngineMessage

T = TypeVar("T")


class Codec(Generic[T]):
    """Encodes any wire Struct; decodes into the tagged union `T` (maps by field name)."""

    def __init__(self, kind: type[T]) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(kind)

    def encode(self, msg: msgspec.Struct) -> bytes:
        return self._encoder.encode(msg)

    def decode(self, data: bytes | memoryview) -> T:
        return self._decoder.decode(data)


def engine_input_codec() -> Codec[EngineInput]:
    return Codec(EngineInput)  # type: ignore[arg-type]


def engine_message_codec() -> Codec[EngineMessage]:
    return Codec(EngineMessage)  # type: ignore[arg-type]
