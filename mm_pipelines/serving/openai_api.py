"""OpenAI-compatible endpoints: what the official `openai` client sends and parses.

- `POST /v1/embeddings`: `input` (a string or a list of strings), `model`,
  `encoding_format` (`float`, or `base64` = little-endian float32, what the client asks
  for by default), `dimensions` (only the model's own); answers `{"object": "list",
  "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}`.
  Extensions, as extra body fields (`extra_body=` in the client): `image_base64` or
  `audio_base64` (one string or a list) instead of `input`; the vectors are in the same
  unified space as text, so they compare with each other and with the index.
- `POST /v1/images/generations`: `prompt`, `n`, `size` (`WxH`, multiples of 8, or `auto` =
  the model's own), `response_format` (`b64_json`; there are no image URLs to hand out),
  `model`; extensions `seed` (image i gets seed + i: the same seed, the same images),
  `steps`, `guidance_scale`. Answers `{"created", "data": [{"b64_json"}], ...}`.
- `GET /v1/models`, `GET /v1/models/{model}`: the bundle's two models, `mm-unified`
  (embeddings) and the generator (its registered LoRA name).

Every answer also carries `bundle_version`. An unknown `model` is a 404 `model_not_found`.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mm_pipelines.serving import app as core
from mm_pipelines.serving.runtime import ServingModels

EMBEDDING_MODEL = "mm-unified"
GENERATOR_FALLBACK = "mm-diffusion"
OWNER = "mm_pipelines"


def generator_id(models: ServingModels) -> str | None:
    if models.pipeline is None and "diffusion" not in models.manifest["models"]:
        return None
    info = models.manifest["models"].get("diffusion", {})
    return str(info.get("registered_name") or GENERATOR_FALLBACK)


def model_cards(models: ServingModels) -> list[dict[str, Any]]:
    created = int(models.manifest.get("created_at_unix", 0) or time.time())
    cards = [
        {
            "id": EMBEDDING_MODEL,
            "object": "model",
            "created": created,
            "owned_by": OWNER,
            "kind": "embeddings",
            "dimensions": models.embed_dim,
            "inputs": ["text", "image", "audio"] if models.whisper else ["text", "image"],
            "bundle_version": models.version,
        }
    ]
    if (gen := generator_id(models)) is not None:
        cards.append(
            {
                "id": gen,
                "object": "model",
                "created": created,
                "owned_by": OWNER,
                "kind": "images",
                "size": "x".join(map(str, models.native_size or ())) or None,
                "bundle_version": models.version,
            }
        )
    return cards


def _check_model(models: ServingModels, body: dict, kind: str) -> str:
    """The requested model (default: the one served for `kind`), or a 404 naming ours."""
    served = [c["id"] for c in model_cards(models) if c["kind"] == kind]
    if not served:
        raise core.ApiError(422, "no_generator", "this bundle has no image generator")
    model = core._field(body, "model", str, served[0])
    if model not in served:
        raise core.ApiError(
            404, "model_not_found", f"model {model!r} is not served here for {kind}; use {served}"
        )
    return model


def _items(body: dict, name: str) -> list[Any] | None:
    value = body.get(name)
    if value is None or value == [] or value == "":
        return None
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in items):
        if name == "input" and all(isinstance(v, int | list) for v in items):
            raise core.ApiError(
                400, "bad_field", "'input' as token ids is not supported: send the text"
            )
        raise core.ApiError(400, "bad_field", f"'{name}' must be a string or a list of strings")
    return items


def _decode(name: str, data: str) -> bytes:
    import binascii

    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise core.ApiError(400, "bad_base64", f"'{name}' is not valid base64") from err


def parse_embeddings(body: dict, limits: core.Limits) -> tuple[str, list[Any]]:
    """(kind: text | image | audio, inputs). `text` is accepted as an old name of `input`."""
    given = {n: _items(body, n) for n in ("input", "text", "image_base64", "audio_base64")}
    present = [n for n, v in given.items() if v is not None]
    if len(present) != 1:
        raise core.ApiError(
            400,
            "bad_input",
            "give exactly one of 'input' (text), 'image_base64' or 'audio_base64' "
            f"(got {present or 'none'})",
        )
    name = present[0]
    items = given[name] or []
    if len(items) > limits.max_inputs:
        raise core.ApiError(
            400, "bad_field", f"'{name}' has {len(items)} items; the limit is {limits.max_inputs}"
        )
    if name in ("input", "text"):
        for text in items:
            if len(text) > limits.max_text_chars:
                raise core.ApiError(
                    400, "bad_field", f"'{name}' is over {limits.max_text_chars} characters"
                )
        return "text", items
    return name.removesuffix("_base64"), [_decode(name, v) for v in items]


def _encode(vector: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
    return vector.tolist()


def routes(api: core.Api) -> list[Route]:
    limits = api.limits

    async def embeddings(request: Request) -> JSONResponse:
        """Embed texts (`input`), or images / audio (extensions) into the unified space."""
        body = await core._read_json(request, limits)
        models = api.models()
        model = _check_model(models, body, "embeddings")
        encoding = core._field(
            body, "encoding_format", str, "float", check=_one_of("float", "base64")
        )
        kind, items = parse_embeddings(body, limits)
        dims = core._field(body, "dimensions", int, models.embed_dim)
        if dims != models.embed_dim:
            raise core.ApiError(
                400, "bad_field", f"'dimensions': {model} has {models.embed_dim}, not {dims}"
            )
        if kind == "text":
            vectors = [await api.compute(models.embed_text, t) for t in items]
            tokens = sum(models.count_tokens(t) for t in items)
        elif kind == "image":
            vectors = [
                await api.compute(models.embed_image, d, limits.max_image_pixels) for d in items
            ]
            tokens = 0
        else:
            vectors = [
                await api.compute(models.embed_audio, d, limits.max_audio_seconds) for d in items
            ]
            tokens = 0
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, encoding)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        out = {"object": "list", "data": data, "model": model, "usage": usage, "input": kind}
        return core._ok(out, models)

    async def generations(request: Request) -> JSONResponse:
        """Images from a prompt with the bundle's generator (the LoRA fused in)."""
        body = await core._read_json(request, limits)
        models = api.models()
        model = _check_model(models, body, "images")
        prompt = core._field(body, "prompt", str, check=core._max_len(limits.max_prompt_chars))
        n = core._field(body, "n", int, 1, check=core._in_range(1, limits.max_images))
        fmt = core._field(body, "response_format", str, "b64_json", check=_b64_only)
        size = _size(core._field(body, "size", str, "auto"), models, limits)
        seed = core._field(body, "seed", int, 0, check=core._in_range(0, 2**63 - n))
        steps = core._field(body, "steps", int, 25, check=core._in_range(1, limits.max_steps))
        guidance = core._field(
            body, "guidance_scale", (int, float), 5.0, check=core._in_range(0, 30)
        )
        pngs = [
            await api.compute(models.generate, prompt, seed + i, steps, float(guidance), size)
            for i in range(n)
        ]
        data = [
            {"b64_json": base64.b64encode(png).decode(), "revised_prompt": None} for png in pngs
        ]
        width, height = size or models.native_size or (0, 0)
        out = {
            "created": int(time.time()),
            "data": data,
            "model": model,
            "output_format": "png",
            "size": f"{width}x{height}",
            "response_format": fmt,
            "seed": seed,
            "steps": steps,
            "guidance_scale": float(guidance),
        }
        return core._ok(out, models)

    async def list_models(request: Request) -> JSONResponse:
        """The models this server answers with (from the loaded bundle)."""
        models = api.models()
        return core._ok({"object": "list", "data": model_cards(models)}, models)

    async def get_model(request: Request) -> JSONResponse:
        """One model by id (404 `model_not_found` otherwise)."""
        models = api.models()
        wanted = request.path_params["model"]
        for card in model_cards(models):
            if card["id"] == wanted:
                return core._ok(dict(card), models)
        raise core.ApiError(404, "model_not_found", f"no model {wanted!r} is served here")

    return [
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model}", get_model, methods=["GET"]),
    ]


def _one_of(*allowed: str):
    return lambda v: None if v in allowed else f"must be one of {list(allowed)}"


def _b64_only(value: str) -> str | None:
    if value == "b64_json":
        return None
    if value == "url":
        return "'url' is not offered (generated images are not stored): use 'b64_json'"
    return "must be 'b64_json'"


def _size(value: str, models: ServingModels, limits: core.Limits) -> tuple[int, int] | None:
    """`WxH` -> (width, height); `auto` -> None (the model's own resolution)."""
    if value == "auto":
        return None
    try:
        width, height = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise core.ApiError(400, "bad_field", "'size' must be 'WIDTHxHEIGHT' or 'auto'") from None
    side = limits.max_image_side
    if not (8 <= width <= side and 8 <= height <= side) or width % 8 or height % 8:
        native = "x".join(map(str, models.native_size or ())) or "none"
        raise core.ApiError(
            400,
            "bad_field",
            f"'size' {value}: width and height must be multiples of 8 up to {side} "
            f"(this model's own size: {native})",
        )
    return width, height
