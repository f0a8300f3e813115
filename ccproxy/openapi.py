"""What ``/v1/openapi.json`` says about the routes that read raw bodies.

The routes parse their bodies themselves (size limit first, lenient forwarding after), so
FastAPI cannot see a body model; the request schemas are declared here from the same pydantic
models that validate, and the responses list every status ccproxy can answer with. The schema
is what the fuzz test (tests/e2e/test_fuzz.py) generates requests from and checks answers against.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ccproxy.messages.protocol import MessagesRequest
from ccproxy.compress_endpoint import CompressCall
from ccproxy.protocol import ChatCompletionRequest
from ccproxy.responses.protocol import ResponsesRequest

ERROR_SCHEMA: dict[str, Any] = {
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
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_ERRORS = {
    400: "Invalid request: a body that is not JSON, wrong types, too deep; a bad query value.",
    401: "Missing, unknown or revoked ccproxy API key.",
    413: "The body is larger than CCPROXY_MAX_BODY_BYTES.",
    429: "A per-key rate limit was reached (Retry-After says when to retry).",
    502: "The upstream could not be reached.",
    503: "Overloaded (Retry-After) or a dependency is unavailable.",
    504: "The upstream did not answer in time.",
}


def inlined_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` substituted in place (no recursive models here),
    so it can sit inside an operation without registering components."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


ANTHROPIC_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}


def _errors(*statuses: int, schema: dict[str, Any] = ERROR_SCHEMA) -> dict[str, Any]:
    return {
        str(status): {
            "description": _ERRORS[status],
            "content": {"application/json": {"schema": schema}},
        }
        for status in statuses
    }


def _body(model: type[BaseModel], **extra: dict[str, Any]) -> dict[str, Any]:
    """The model's schema; ``extra`` declares the fields the route checks apart from the model."""
    schema = inlined_schema(model)
    if extra:
        schema = {**schema, "properties": {**schema.get("properties", {}), **extra},
                  "required": [*schema.get("required", []), *extra]}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_RELAYED_ANSWER = {
    "description": "The upstream's answer, relayed (JSON, or server-sent events when stream is true).",
    "content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
            }
        },
    },
}


CHAT_COMPLETIONS: dict[str, Any] = {
    "requestBody": _body(ChatCompletionRequest),
    "responses": {
        "200": _RELAYED_ANSWER,
        **_errors(400, 401, 413, 429, 502, 503, 504),
        "default": {"description": "The upstream's own error status and body, relayed unchanged."},
    },
}

COMPRESS: dict[str, Any] = {
    "requestBody": _body(CompressCall),
    "responses": {
        "200": {
            "description": "The compressed messages and one report per unit. With `config` (sidecar mode, "
            "docs/SIDECAR.md): one message per message sent, shortened ones ending with a marker; "
            "`ccr_hashes` lists the markers' retrieval ids (`config.mode` `ccr`).",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["object", "outcome", "messages", "tokens_before", "tokens_after",
                                     "tokens_saved", "compression_ratio", "ccr_hashes", "units"],
                        "properties": {
                            "object": {"const": "ccproxy.compression"},
                            "outcome": {"type": "string"},
                            "messages": {"type": "array", "items": {"type": "object"}},
                            "tokens_before": {"type": "integer", "minimum": 0},
                            "tokens_after": {"type": "integer", "minimum": 0},
                            "tokens_saved": {"type": "integer"},
                            "compression_ratio": {"type": "number", "minimum": 0},
                            "ccr_hashes": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{24}$"}},
                            "units": {"type": "array", "items": {"type": "object"}},
                        },
                    }
                }
            },
        },
        **_errors(400, 401, 413, 429, 503),
    },
}

RETRIEVE: dict[str, Any] = {
    "parameters": [
        {
            "name": "ref",
            "in": "path",
            "required": True,
            "description": "An id from `ccr_hashes` (a marker's `hash=`).",
            "schema": {"type": "string"},
        },
        {
            "name": "query",
            "in": "query",
            "required": False,
            "description": "Accepted for the headroom contract and ignored: the whole original comes back.",
            "schema": {"type": "string"},
        }
    ],
    "responses": {
        "200": {
            "description": "The original text of a message that sidecar mode shortened, for the account "
            "that compressed it, while it is kept (CCPROXY_RETRIEVAL_TTL_S).",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["object", "hash", "original_content"],
                        "properties": {
                            "object": {"const": "ccproxy.retrieval"},
                            "hash": {"type": "string"},
                            "original_content": {"type": "string"},
                        },
                    }
                }
            },
        },
        **_errors(401, 429),
        "404": {
            "description": "Unknown, expired or evicted id, or one kept for another account.",
            "content": {"application/json": {"schema": ERROR_SCHEMA}},
        },
    },
}

USAGE: dict[str, Any] = {
    "responses": {
        "200": {
            "description": "The calling key's account usage.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["object", "account", "from", "to", "granularity", "totals", "series"],
                        "properties": {
                            "object": {"const": "usage"},
                            "totals": {"type": "object"},
                            "series": {"type": "array", "items": {"type": "object"}},
                        },
                    }
                }
            },
        },
        **_errors(400, 401, 503),
    },
}

RESPONSES_ROUTE: dict[str, Any] = {
    "requestBody": _body(
        ResponsesRequest,
        input={"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
    ),
    "responses": {
        "200": _RELAYED_ANSWER,
        **_errors(400, 401, 413, 429, 502, 503, 504),
        "default": {"description": "The upstream's own error status and body, relayed unchanged."},
    },
}

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
    },
}

MESSAGES_ROUTE: dict[str, Any] = {
    "requestBody": _body(MessagesRequest, messages={"type": "array", "minItems": 1, "items": _MESSAGE}),
    "responses": {
        "200": _RELAYED_ANSWER,
        **_errors(400, 401, 413, 429, 502, 503, 504, schema=ANTHROPIC_ERROR_SCHEMA),
        "404": {
            "description": "No Anthropic upstream is configured (CCPROXY_ANTHROPIC_UPSTREAM_URL).",
            "content": {"application/json": {"schema": ANTHROPIC_ERROR_SCHEMA}},
        },
        "default": {"description": "The upstream's own error status and body, relayed unchanged."},
    },
}

COUNT_TOKENS_ROUTE: dict[str, Any] = {
    **MESSAGES_ROUTE,
    "responses": {
        **MESSAGES_ROUTE["responses"],
        "200": {
            "description": "The upstream's count of the request as /v1/messages would forward it.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    },
}
