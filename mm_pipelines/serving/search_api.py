"""`POST /v1/search`: one ranked list across modalities for one tenant.

Body: `query` (text), or `image_base64` / `audio_base64` (a file as the query); `tenant`;
`k` (hits, default 10); `modalities`, `batches` (filters); `min_score` (calibrated, 0..1,
comparable across kinds: see pipeline/ranking.py). Answer: `hits` (best first: images,
video moments with timestamps, spoken passages with text, document passages, sounds, each
with the name of the file it was first seen as and the hash to fetch from /v1/media) and
the same hits by group under `groups`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mm_pipelines.serving import app as core
from mm_pipelines.serving import auth
from mm_pipelines.serving.runtime import ServingModels


async def query_vector(
    api: core.Api, models: ServingModels, body: dict[str, Any]
) -> tuple[Any, str, str]:
    """(vector, query modality, query as shown) from exactly one of the query fields."""
    limits = api.limits
    given = [k for k in ("query", "image_base64", "audio_base64") if body.get(k) is not None]
    if len(given) != 1:
        raise core.ApiError(
            400, "bad_input", "give exactly one of 'query', 'image_base64', 'audio_base64'"
        )
    if given[0] == "query":
        query = core._field(body, "query", str, check=core._max_len(limits.max_text_chars))
        return await api.compute(models.embed_text, query), "text", query
    if given[0] == "image_base64":
        data = core._b64(body, "image_base64")
        vector = await api.compute(models.embed_image, data, limits.max_image_pixels)
        return vector, "image", "(an image)"
    data = core._b64(body, "audio_base64")
    vector = await api.compute(models.embed_audio, data, limits.max_audio_seconds)
    return vector, "audio", "(a sound)"


def routes(api: core.Api) -> list[Route]:
    limits = api.limits

    async def search(request: Request) -> JSONResponse:
        """Search the index for one tenant; one ranked list across modalities."""
        body = await core._read_json(request, limits)
        models = api.models()
        tenant = core.request_tenant(request, body.get("tenant"))
        k = core._field(body, "k", int, 10, check=core._in_range(1, limits.max_k))
        modalities = core._field(
            body, "modalities", list, None, check=core._subset(core.MODALITIES)
        )
        batches = core._field(body, "batches", list, None, check=core._strings)
        min_score = core._field(body, "min_score", (int, float), 0.0, check=core._in_range(0, 1))
        if api.pool is None:
            raise core.ApiError(503, "no_catalog", "this server has no catalog database configured")
        vector, modality, shown = await query_vector(api, models, body)
        ranked = await api.db(
            lambda conn: models.ranked_search(
                conn,
                vector,
                modality,
                tenant=tenant,
                query=shown,
                k=k,
                modalities=modalities,
                batches=batches,
                min_score=float(min_score),
            )
        )
        answer = ranked.as_dict()
        answer["hits"] = auth.visible_hits(request, answer["hits"])
        answer["groups"] = {g: auth.visible_hits(request, h) for g, h in answer["groups"].items()}
        return core._ok({**answer, "tenant": tenant, "k": k}, models)

    return [Route("/v1/search", search, methods=["POST"])]
