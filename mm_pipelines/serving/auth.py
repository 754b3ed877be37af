"""Who is calling: API keys, tenants and rate limits for every route of the serving API.

`AuthMiddleware` wraps the whole ASGI app, so a route added later is covered without a
line of its own. Each request but `/healthz` needs `Authorization: Bearer <key>`; the key
is checked in Postgres on every request (a revoked key is refused at once) and its token
bucket must have a token (429 with `Retry-After` otherwise). The key's identity is put in
`request.state.principal`; the endpoints ask it which tenant to serve (`request_tenant`:
the key's tenant, never the body's) and what a hit may show (`visible_hits`: no landing
paths for tenant keys).

With `mm serve --no-auth` (the local demo) there are no keys: the tenant comes from the
body as before and every request is answered.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import psycopg

from mm_pipelines.storage.api_keys import ApiKey

log = logging.getLogger(__name__)

# probes carry no key; the search page and the API description hold no data
PUBLIC_PATHS = frozenset({"/healthz", "/", "/openapi.json"})
MEDIA_PREFIX = "/v1/media/"  # <img> and <video> cannot send headers: `?key=` there
MISSING_KEY = (
    "an API key is required: send it as 'Authorization: Bearer <key>' "
    "(an operator creates one with `mm keys create --tenant T`)"
)


@dataclass(frozen=True)
class Principal:
    key_id: str | None  # None: --no-auth
    tenant: str | None  # None: any tenant, named in the body (admin key or --no-auth)
    admin: bool


NO_AUTH = Principal(None, None, True)


class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `rate_per_minute`."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: ApiKey, now: float | None = None) -> float:
        """0.0 if a request may go now, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        rate = key.rate_per_minute / 60.0
        with self._lock:
            tokens, at = self._buckets.get(key.key_id, (float(key.burst), now))
            tokens = min(float(key.burst), tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key.key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key.key_id] = (tokens, now)
            return (1.0 - tokens) / rate


Authenticate = Callable[[str], ApiKey | None]  # token -> active key (blocking: a DB query)


def keys_in(run_on_catalog: Callable[[Callable[[Any], Any]], Any]) -> Authenticate:
    """Look tokens up in the catalog database (e.g. `ConnectionPool.run`)."""
    from mm_pipelines.storage import api_keys

    return lambda token: run_on_catalog(lambda conn: api_keys.authenticate(conn, token))


class AuthMiddleware:
    """Pure ASGI (no buffering of bodies): refuses before the route reads anything."""

    def __init__(self, app: Any, authenticate: Authenticate, limiter: RateLimiter) -> None:
        self.app = app
        self.authenticate = authenticate
        self.limiter = limiter
        self.db = anyio.CapacityLimiter(4)  # key lookups wait on Postgres, not on the CPU

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if token is None:
            await _refuse(send, 401, "unauthorized", MISSING_KEY)
            return
        try:
            key = await anyio.to_thread.run_sync(self.authenticate, token, limiter=self.db)
        except psycopg.OperationalError as err:
            log.warning("API keys unavailable: %s", err)
            await _refuse(send, 503, "auth_unavailable", "API keys cannot be checked now")
            return
        if key is None:
            await _refuse(send, 401, "unauthorized", "unknown or revoked API key")
            return
        wait = self.limiter.take(key)
        if wait > 0:
            retry = str(max(1, math.ceil(wait)))
            await _refuse(
                send,
                429,
                "rate_limited",
                f"over this key's limit of {key.rate_per_minute} requests per minute "
                f"(bursts of {key.burst}); retry in {retry} s",
                [(b"retry-after", retry.encode())],
            )
            return
        scope.setdefault("state", {})["principal"] = Principal(key.key_id, key.tenant, key.admin)
        await self.app(scope, receive, send)


def _bearer(scope: dict) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    if scope.get("method") == "GET" and scope["path"].startswith(MEDIA_PREFIX):
        keys = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key")
        return keys[0].strip() or None if keys else None
    return None


async def _refuse(
    send: Any, status: int, code: str, message: str, headers: list | None = None
) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- for endpoints


def principal(request: Any) -> Principal:
    """Who sent the request (NO_AUTH when the server runs without keys)."""
    return getattr(request.state, "principal", NO_AUTH)


class TenantMismatch(Exception):
    """The body names another tenant than the key's."""


def request_tenant(request: Any, body: dict[str, Any]) -> str | None:
    """The key's tenant, whatever the body says (a body that names another tenant is
    refused, not silently narrowed); None for an admin key or --no-auth, whose tenant the
    body must name."""
    who = principal(request)
    if who.tenant is None:
        return None
    named = body.get("tenant")
    if named is not None and named != who.tenant:
        raise TenantMismatch(f"this API key is bound to another tenant than {named!r}")
    return who.tenant


def visible_hits(request: Any, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hits as this caller may see them: tenant keys get the content hash and the file's
    name inside its batch instead of the landing URI (no local paths, no bucket names)."""
    if principal(request).admin:
        return hits
    return [_without_location(hit) for hit in hits]


def _without_location(hit: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in hit.items() if k != "source_uri"}
    uri = hit.get("source_uri")
    if uri:
        out["source_name"] = batch_relative_name(uri, hit.get("batch"))
    return out


def batch_relative_name(uri: str, batch: str | None) -> str:
    """`images/a.png` of `file:///.../landing/<batch>/images/a.png` (or an s3:// URI)."""
    path = unquote(urlsplit(uri).path)
    marker = f"/{batch}/" if batch else None
    if marker and marker in path:
        return path.split(marker, 1)[1]
    return path.rsplit("/", 1)[-1]
