"""headrace: an OpenAI-compatible LLM inference server with its own engine."""

from headrace.offline import LLM, RequestOutput
from headrace.wire.messages import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]
