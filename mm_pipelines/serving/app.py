"""The serving HTTP API (ASGI, Starlette).

Endpoints: OpenAI-compatible `/v1/embeddings`, `/v1/images/generations` and `/v1/models`
(serving/openai_api.py), `/v1/search` (serving/search_api.py), the search page and
`/v1/media/{hash}` (serving/ui.py), `/openapi.json` (serving/openapi.py), `/healthz`.

Starlette rather than FastAPI: a handful of endpoints with a few fields each do not need
pydantic models or generated docs (the OpenAPI document is written by hand), and the
limits have to act before any parsing (the body is counted while it streams in, so an
oversized upload is refused at the limit, not after it is held in memory); FastAPI would
add a validation layer whose 422 bodies echo the client's input back. FastAPI is itself
built on Starlette, so nothing is lost.

Model work runs in worker threads (``anyio.to_thread``) behind a limiter sized to the
CPU count, so the event loop keeps accepting and answering (health, 4xx) while models
compute. Every answer names the bundle it was computed with (body and header
``X-Bundle-Version``); errors are JSON ``{"error": {"code", "message", "type"}}`` (OpenAI's
shape) with a 4xx
for the client's mistakes and a bare 500 for ours (the traceback stays in the log).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mm_pipelines.serving import auth
from mm_pipelines.serving.bundles import BundleManager
from mm_pipelines.serving.runtime import InputError, ServingModels
from mm_pipelines.storage.text import storable_text_problem

log = logging.getLogger(__name__)
MODALITIES = ("image", "video", "audio", "text")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 2**20  # base64 of a few-MB image or a minute of audio
    max_image_pixels: int = 16_000_000  # decoding costs 3 bytes/pixel before resizing
    max_audio_seconds: float = 60.0
    max_text_chars: int = 2000
    max_k: int = 100
    max_steps: int = 50
    max_prompt_chars: int = 1000
    body_timeout_s: float = 30.0  # a stalled upload is answered 408, not held open forever
    max_inputs: int = 64  # items in one /v1/embeddings request
    max_images: int = 4  # `n` of one /v1/images/generations request
    max_image_side: int = 1024  # generated width/height


class ConnectionPool:
    """A few reusable catalog connections (psycopg_pool is not a dependency here).

    Opened lazily; a broken connection is dropped instead of returned."""

    def __init__(self, dsn_factory: Callable[[], str], size: int = 4) -> None:
        self._dsn_factory = dsn_factory
        self._dsn: str | None = None
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._lock = threading.Lock()
        self.size = size

    def _connect(self) -> psycopg.Connection:
        with self._lock:
            if self._dsn is None:
                from mm_pipelines.storage.postgres import ensure_schema

                dsn = self._dsn_factory()
                ensure_schema(dsn)
                self._dsn = dsn
        conn = psycopg.connect(self._dsn, autocommit=True)
        from pgvector.psycopg import register_vector

        register_vector(conn)
        return conn

    def run(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(conn)`. A pooled connection that turns out broken (Postgres restarted since
        it was opened) is dropped and `fn` runs once more on a new one, so a restart costs
        no failed request."""
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            return self._run_on(self._connect(), fn)
        try:
            return self._run_on(conn, fn)
        except psycopg.OperationalError:
            if not (conn.broken or conn.closed):
                raise
            log.info("a pooled catalog connection was broken: reconnecting once")
            self.close()  # its siblings are as stale
            return self._run_on(self._connect(), fn)

    def _run_on(self, conn: psycopg.Connection, fn: Callable[[Any], Any]) -> Any:
        try:
            result = fn(conn)
        except BaseException:
            if conn.broken or conn.closed:
                conn.close()
                raise
            self._put(conn)
            raise
        self._put(conn)
        return result

    def _put(self, conn) -> None:
        if self._idle.qsize() < self.size and not conn.closed:
            self._idle.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        while True:  # other threads take and return connections meanwhile
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> JSONResponse:
    # OpenAI's error shape (clients parse `type`); `code` is ours, stable across versions
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"code": code, "message": message, "type": kind, "param": None}}
    return JSONResponse(body, status_code=status)


def _ok(body: dict[str, Any], models: ServingModels) -> JSONResponse:
    body["bundle_version"] = models.version
    return JSONResponse(body, headers={"X-Bundle-Version": models.version})


async def _read_json(request: Request, limits: Limits) -> dict[str, Any]:
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"request body over the {limit}-byte limit")
    chunks, size = [], 0
    try:
        with anyio.fail_after(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # chunked uploads have no length: count as they come
                    raise ApiError(
                        413, "body_too_large", f"request body over the {limit}-byte limit"
                    )
                chunks.append(chunk)
    except ClientDisconnect as err:
        raise ApiError(400, "client_disconnected", "the request body was cut off") from err
    except TimeoutError as err:
        raise ApiError(
            408, "body_timeout", f"the request body did not arrive within {limits.body_timeout_s} s"
        ) from err
    try:
        body = json.loads(b"".join(chunks))
    except RecursionError as err:
        raise ApiError(400, "bad_json", "the body is nested too deeply") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, "bad_json", f"the body is not valid JSON ({err})") from err
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    _check_text(body)
    return body


def _check_text(body: dict[str, Any]) -> None:
    """Every string of the body (keys too) must be text we can store and answer with: a
    NUL breaks Postgres, a lone surrogate breaks the JSON answer and the tokenizers."""
    todo: list[tuple[str, Any]] = [("", body)]
    while todo:  # not recursive: depth is the client's choice
        where, value = todo.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                name = f"{where}.{key}" if where else str(key)
                if problem := storable_text_problem(str(key)):
                    raise ApiError(400, "bad_text", f"a field name {problem}")
                todo.append((name, item))
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str) and (problem := storable_text_problem(value)):
            shown = where.encode("utf-8", "backslashreplace").decode()
            raise ApiError(400, "bad_text", f"'{shown}' {problem}")


def _field(body: dict, name: str, kind: type | tuple, default: Any = ..., check=None) -> Any:
    if name not in body or body[name] is None:
        if default is ...:
            raise ApiError(400, "missing_field", f"'{name}' is required")
        return default
    value = body[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ApiError(400, "bad_field", f"'{name}' must be of type {names}")
    if check is not None and (why := check(value)):
        raise ApiError(400, "bad_field", f"'{name}' {why}")
    return value


def _b64(body: dict, name: str) -> bytes:
    try:
        return base64.b64decode(_field(body, name, str), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, "bad_base64", f"'{name}' is not valid base64") from err


def request_tenant(request: Request, given: Any) -> str:
    """The tenant a request acts for: a tenant key's own (naming another one is a 403), else
    the one the request names (body field or `?tenant=`: admin keys, `--no-auth`)."""
    bound = auth.request_tenant(request, {} if given is None else {"tenant": given})
    if bound is not None:
        return bound
    if given is None:
        raise ApiError(400, "missing_field", "'tenant' is required")
    if not isinstance(given, str) or not given.strip():
        raise ApiError(400, "bad_field", "'tenant' must be a non-empty string")
    return given


@dataclass
class Api:
    """What the endpoint modules are given: the current bundle, the catalog, the media store
    and the limits, with the thread pools model work and index queries run in."""

    manager: BundleManager
    pool: ConnectionPool | None
    limits: Limits
    media: Any
    limiter: anyio.CapacityLimiter
    db_limiter: anyio.CapacityLimiter

    def models(self) -> ServingModels:
        self.manager.nudge()
        models = self.manager.current  # taken once: this request's bundle to the end
        if models is None:
            raise ApiError(503, "no_bundle", "no serving bundle is loaded yet")
        return models

    async def compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def db(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(connection)` on a pooled catalog connection, in the index-query pool."""
        pool = self.pool
        if pool is None:
            raise ApiError(503, "no_catalog", "this server has no catalog database configured")
        try:
            return await anyio.to_thread.run_sync(pool.run, fn, limiter=self.db_limiter)
        except psycopg.OperationalError as err:
            log.warning("catalog unavailable: %s", err)
            raise ApiError(503, "catalog_unavailable", "the catalog is unavailable") from err


def create_app(
    manager: BundleManager,
    pool: ConnectionPool | None = None,
    limits: Limits = Limits(),
    workers: int | None = None,
    keys: auth.Authenticate | None = None,
    media: Any = None,
) -> Starlette:
    """`keys`: how a bearer token becomes an API key (None: no keys, `mm serve --no-auth`)."""
    from mm_pipelines.models.common import available_cpus
    from mm_pipelines.serving import openai_api, openapi, search_api, ui

    limiter = anyio.CapacityLimiter(workers or available_cpus())
    # index queries wait on Postgres, not on our CPU: as many in flight as pooled connections
    db_limiter = anyio.CapacityLimiter(pool.size if pool is not None else 1)
    api = Api(manager, pool, limits, media, limiter, db_limiter)

    async def healthz(request: Request) -> JSONResponse:
        """Liveness and the loaded bundle's models (503 until a bundle is loaded)."""
        manager.nudge()
        models = manager.current
        status = _public_status(manager.status())
        if models is None:
            return JSONResponse({"status": "no_bundle", **status}, status_code=503)
        body = {"status": "ok", "models": models.describe(), **status}
        return _ok(body, models)

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return _error(exc.status, exc.code, exc.message)

    async def on_input_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InputError)
        return _error(exc.status, exc.code, str(exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    async def on_tenant_mismatch(request: Request, exc: Exception) -> JSONResponse:
        return _error(403, "tenant_mismatch", str(exc))

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return _error(500, "internal", "internal server error")

    # every route behind the keys, including routes added later (one middleware, not one
    # check per endpoint)
    middleware = (
        [Middleware(auth.AuthMiddleware, authenticate=keys, limiter=auth.RateLimiter())]
        if keys is not None
        else []
    )
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        *openai_api.routes(api),  # /v1/embeddings, /v1/images/generations, /v1/models
        *search_api.routes(api),  # /v1/search
        *ui.routes(api),  # the search page and /v1/media/{content_hash}
    ]
    routes.append(openapi.route(routes))  # /openapi.json, describing all of the above
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: on_api_error,
            InputError: on_input_error,
            HTTPException: on_http_error,
            auth.TenantMismatch: on_tenant_mismatch,
            Exception: on_crash,
        },
        middleware=middleware,
    )
    app.state.manager = manager
    return app


def _public_status(status: dict[str, Any]) -> dict[str, Any]:
    """The bundle manager's status without local paths (the store's folder, cache paths in
    error messages): /healthz answers anyone."""
    public = {k: v for k, v in status.items() if k != "store"}
    public["failed_bundles"] = {
        version: _ABS_PATH.sub(lambda m: ".../" + "/".join(m.group(0).split("/")[-2:]), why)
        for version, why in status.get("failed_bundles", {}).items()
    }
    return public


_ABS_PATH = re.compile(r"(?:/[^\s/:'\"]+){2,}")


def _max_len(n: int):
    return lambda v: f"is over {n} characters" if len(v) > n else None


def _in_range(lo: float, hi: float):
    return lambda v: f"must be between {lo} and {hi}" if not lo <= v <= hi else None


def _subset(allowed: tuple[str, ...]):
    def check(v: list) -> str | None:
        bad = [m for m in v if m not in allowed]
        return f"has unknown values {bad}; use {list(allowed)}" if bad else None

    return check


def _strings(v: list) -> str | None:
    return None if all(isinstance(x, str) for x in v) else "must be a list of strings"
