"""`/openapi.json` that says what this server really accepts and answers.

FastAPI's document is generated from the pydantic models; on top of it:
- the request bodies, which the routes decode themselves (`api/body.py`);
- errors are OpenAI bodies with 400 (FastAPI would say 422), 401 where an API key guards the
  route, 404 for an unknown model, 413 for a body over the cap, 503 while not serving;
- `model` is one of the served names; token ids are below the vocabulary's size; `max_tokens`
  fits the context window; `data_parallel_rank` is a rank of this server; `n` is at most
  `--max-num-queued-reqs` when that is set; `tools` need a `tool_choice` other than `auto`
  unless the server runs with `--enable-auto-tool-choice`.
The limits are known once the tokenizer and an engine are loaded; until then the document is
built without them and not cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

if TYPE_CHECKING:
    from headrace.api.context import ServerContext

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "integer"},
            },
        }
    },
}
_WHY = {
    400: "Invalid request",
    401: "Missing or wrong API key",
    404: "Unknown model",
    413: "Body over the size cap",
    503: "Not serving now (loading, restarting, draining, failed, or over a queue limit)",
}
_INFERENCE = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
_TOKEN_FIELDS = ("prompt", "tokens", "stop_token_ids", "allowed_token_ids")


def install_openapi(app: FastAPI, ctx: ServerContext) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _describe_bodies(doc)
        _describe_errors(doc, api_key=ctx.config.api_key is not None)
        vocab = ctx.tokenizer.vocab_size if ctx.tokenizer is not None else 0
        max_len = ctx.client.max_model_len
        if vocab and max_len:
            _describe_limits(doc, ctx, vocab, max_len)
            app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _describe_bodies(doc: dict[str, Any]) -> None:
    """The routes decode their bodies themselves (`api/body.py`), so FastAPI does not know
    them: each body's schema is added here."""
    from headrace.api import protocol
    from headrace.api.responses_request import ResponsesRequest

    bodies: dict[str, type[BaseModel]] = {
        "/v1/completions": protocol.CompletionRequest,
        "/v1/chat/completions": protocol.ChatCompletionRequest,
        "/v1/responses": ResponsesRequest,
        "/tokenize": protocol.TokenizeRequest,
        "/detokenize": protocol.DetokenizeRequest,
    }
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, model in bodies.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref}},
        }


def _describe_errors(doc: dict[str, Any], api_key: bool) -> None:
    doc.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = _ERROR_SCHEMA
    for schema in ("HTTPValidationError", "ValidationError"):
        doc["components"]["schemas"].pop(schema, None)
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in doc["paths"].items():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            codes: list[int] = []
            if "requestBody" in op:
                codes += [400, 404, 413]  # every body may name a model
            if path.startswith("/v1/") and api_key:
                codes.append(401)
            if path in _INFERENCE or path.startswith("/health") or path == "/v1/models":
                codes.append(503)
            for code in codes:
                responses[str(code)] = {"description": _WHY[code], "content": error}
            if path in _INFERENCE:  # "stream": true answers with server-sent events
                responses["200"]["content"] = {
                    "application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {  # each event: one JSON chunk, then "[DONE]"
                        "schema": {"type": "object", "properties": {"data": {"type": "string"}}}
                    },
                }


def _describe_limits(doc: dict[str, Any], ctx: ServerContext, vocab: int, max_len: int) -> None:
    names = [*ctx.config.served_model_names, ""]  # "" (like null) means the first name
    max_choices = ctx.config.max_num_queued_reqs
    if not (ctx.config.enable_auto_tool_choice and ctx.config.tool_call_parser):
        # tools without a tool_choice mean "auto", which this server was not started for
        for request in ("ChatCompletionRequest", "ResponsesRequest"):
            tools: dict[str, Any] = {"required": ["tools"]}
            if request == "ResponsesRequest":  # there, `auto` with no tools is no tools
                tools["properties"] = {"tools": {"type": "array", "minItems": 1}}
            doc["components"]["schemas"][request].setdefault("allOf", []).append(
                {
                    "if": tools,
                    "then": {
                        "required": ["tool_choice"],
                        "properties": {"tool_choice": {"not": {"const": "auto"}}},
                    },
                }
            )
    for schema in doc["components"]["schemas"].values():
        props = schema.get("properties", {})
        if "model" in props:
            props["model"] = {"anyOf": [{"enum": names}, {"type": "null"}], "title": "Model"}
        for field in _TOKEN_FIELDS:
            if field in props:
                _bound_integers(props[field], vocab - 1)
        # a prompt has one token at least
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if field in props:
                _bound_integers(props[field], max_len - 1)
        if "truncate_prompt_tokens" in props:  # more than the window is a 400 (vLLM's rule)
            _bound_integers(props["truncate_prompt_tokens"], max_len)
        if "data_parallel_rank" in props:
            ranks = len(ctx.client.engines)
            props["data_parallel_rank"] = {
                "anyOf": [{"type": "integer", "minimum": 0, "maximum": ranks - 1}, {"type": "null"}]
            }
        if "n" in props and max_choices is not None:
            props["n"]["maximum"] = min(props["n"].get("maximum", max_choices), max_choices)


def _bound_integers(node: Any, maximum: int) -> None:
    """Every integer schema under `node` gets `maximum`."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = min(node.get("maximum", maximum), maximum)
        for value in node.values():
            _bound_integers(value, maximum)
    elif isinstance(node, list):
        for item in node:
            _bound_integers(item, maximum)
