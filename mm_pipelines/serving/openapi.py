"""`GET /openapi.json`: an OpenAPI 3.1 description of every endpoint of the serving app.

Written by hand (the app is plain Starlette); a test checks that every route of the app is
described with its methods, so a new endpoint cannot go undocumented.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

VERSION = "1.0"


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict:
    out: dict[str, Any] = {"type": "object", "properties": props, **extra}
    if required:
        out["required"] = required
    return out


STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
STRINGS = {"type": "array", "items": STR}
ONE_OR_MANY = {"oneOf": [STR, STRINGS]}
MODALITY = {"type": "string", "enum": ["image", "video", "audio", "text"]}

ERROR = _obj(
    {
        "error": _obj(
            {
                "code": STR,
                "message": STR,
                "type": {"type": "string", "enum": ["invalid_request_error", "server_error"]},
                "param": {"type": ["string", "null"]},
            },
            ["code", "message", "type"],
        )
    },
    ["error"],
)

EMBEDDINGS_REQUEST = _obj(
    {
        "input": {**ONE_OR_MANY, "description": "text(s) to embed"},
        "model": {**STR, "default": "mm-unified"},
        "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
        "dimensions": {**INT, "description": "only the model's own"},
        "user": STR,
        "image_base64": {**ONE_OR_MANY, "description": "extension: image(s) instead of input"},
        "audio_base64": {**ONE_OR_MANY, "description": "extension: audio clip(s) instead"},
    },
    description="Exactly one of input, image_base64, audio_base64.",
)
EMBEDDINGS_RESPONSE = _obj(
    {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": _obj(
                {
                    "object": {"const": "embedding"},
                    "index": INT,
                    "embedding": {
                        "oneOf": [{"type": "array", "items": NUM}, STR],
                        "description": "floats, or base64 of little-endian float32",
                    },
                },
                ["object", "index", "embedding"],
            ),
        },
        "model": STR,
        "usage": _obj({"prompt_tokens": INT, "total_tokens": INT}),
        "bundle_version": STR,
    },
    ["object", "data", "model", "usage"],
)
GENERATIONS_REQUEST = _obj(
    {
        "prompt": STR,
        "model": STR,
        "n": {**INT, "minimum": 1, "default": 1},
        "size": {**STR, "description": "WIDTHxHEIGHT (multiples of 8) or auto", "default": "auto"},
        "response_format": {"type": "string", "enum": ["b64_json"], "default": "b64_json"},
        "seed": {**INT, "default": 0, "description": "extension: image i uses seed + i"},
        "steps": {**INT, "default": 25, "description": "extension: denoising steps"},
        "guidance_scale": {**NUM, "default": 5.0, "description": "extension"},
    },
    ["prompt"],
)
GENERATIONS_RESPONSE = _obj(
    {
        "created": INT,
        "data": {"type": "array", "items": _obj({"b64_json": STR, "revised_prompt": {}})},
        "model": STR,
        "output_format": {"const": "png"},
        "size": STR,
        "seed": INT,
        "bundle_version": STR,
    },
    ["created", "data"],
)
MODEL = _obj(
    {
        "id": STR,
        "object": {"const": "model"},
        "created": INT,
        "owned_by": STR,
        "kind": {"type": "string", "enum": ["embeddings", "images"]},
    },
    ["id", "object", "created", "owned_by"],
)
HIT = _obj(
    {
        "rank": INT,
        "kind": {"type": "string", "enum": ["image", "video", "speech", "text", "sound"]},
        "score": {**NUM, "description": "calibrated 0..1, comparable across kinds"},
        "cosine": NUM,
        "name": {**STR, "description": "the file it was first seen as"},
        "source_uri": STR,
        "batch": STR,
        "tenant": STR,
        "media_hash": {**STR, "description": "GET /v1/media/{media_hash}"},
        "thumb_hash": STR,
        "matched_frames": {
            "type": "array",
            "items": _obj({"timestamp_s": NUM, "score": NUM, "frame_hash": STR}),
        },
        "start_s": NUM,
        "end_s": NUM,
        "text": STR,
    },
    ["rank", "kind", "score", "name"],
)
SEARCH_REQUEST = _obj(
    {
        "query": STR,
        "image_base64": STR,
        "audio_base64": STR,
        "tenant": STR,
        "k": {**INT, "default": 10},
        "modalities": {"type": "array", "items": MODALITY},
        "batches": STRINGS,
        "min_score": {**NUM, "minimum": 0, "maximum": 1, "default": 0},
    },
    ["tenant"],
    description="Exactly one of query, image_base64, audio_base64.",
)
SEARCH_RESPONSE = _obj(
    {
        "query": STR,
        "query_modality": STR,
        "hits": {"type": "array", "items": HIT},
        "groups": {"type": "object"},
        "tenant": STR,
        "k": INT,
        "bundle_version": STR,
    },
    ["hits", "bundle_version"],
)


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _op(summary: str, ok: dict | None, body: dict | None = None, **extra: Any) -> dict:
    responses: dict[str, Any] = {
        "200": {"description": "OK", **(ok or {})},
        "4XX": {"description": "the client's mistake", **_json(ERROR)},
        "503": {"description": "no bundle / catalog yet", **_json(ERROR)},
    }
    out: dict[str, Any] = {"summary": summary, "responses": responses, **extra}
    if body is not None:
        out["requestBody"] = {"required": True, **_json(body)}
    return out


def document() -> dict[str, Any]:
    tenant_q = {"name": "tenant", "in": "query", "required": True, "schema": STR}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mm_pipelines serving API",
            "version": VERSION,
            "description": "Embeddings, image generation and models are OpenAI-compatible "
            "(the official `openai` client works against them); search, media and the search "
            'page are ours. Errors: {"error": {"code", "message", "type"}}.',
        },
        "paths": {
            "/healthz": {"get": _op("liveness and the loaded bundle", _json({"type": "object"}))},
            "/v1/embeddings": {
                "post": _op(
                    "embed text, images or audio into the unified space",
                    _json(EMBEDDINGS_RESPONSE),
                    EMBEDDINGS_REQUEST,
                )
            },
            "/v1/images/generations": {
                "post": _op(
                    "generate images with the served LoRA",
                    _json(GENERATIONS_RESPONSE),
                    GENERATIONS_REQUEST,
                )
            },
            "/v1/models": {
                "get": _op(
                    "the served models",
                    _json(
                        _obj(
                            {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL}}
                        )
                    ),
                )
            },
            "/v1/models/{model}": {
                "get": _op(
                    "one served model",
                    _json(MODEL),
                    parameters=[{"name": "model", "in": "path", "required": True, "schema": STR}],
                )
            },
            "/v1/search": {
                "post": _op(
                    "one ranked list of images, video moments, speech, texts and sounds",
                    _json(SEARCH_RESPONSE),
                    SEARCH_REQUEST,
                )
            },
            "/v1/media/{content_hash}": {
                "get": _op(
                    "the bytes of a stored object, for its tenant (range requests supported)",
                    {"content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                    parameters=[
                        {"name": "content_hash", "in": "path", "required": True, "schema": STR},
                        tenant_q,
                    ],
                )
            },
            "/": {
                "get": _op(
                    "the search page (HTML); ?q=...&tenant=... runs a search on load",
                    {"content": {"text/html": {"schema": STR}}},
                )
            },
            "/openapi.json": {"get": _op("this document", _json({"type": "object"}))},
        },
    }


def route(routes: list[Route]) -> Route:
    async def openapi(request: Request) -> JSONResponse:
        """This OpenAPI document."""
        return JSONResponse(document())

    return Route("/openapi.json", openapi, methods=["GET"])
