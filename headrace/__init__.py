"""headrace: an OpenAI-compatible LLM inference server with its own engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from headrace.wire.messages import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from headrace.offline import LLM, RequestOutput

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutput", "SamplingParams", "StructuredOutputsParams", "__version__"]


def __getattr__(name: str) -> Any:
    # The offline API pulls in torch; server processes that never use it do not pay for that.
    if name in ("LLM", "RequestOutput"):
        from headrace import offline

        return getattr(offline, name)
    raise AttributeError(name)
