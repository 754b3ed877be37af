"""API keys of the serving API, hashed at rest (migration 0007_api_keys.sql).

A key reads `mm_<key_id>_<secret>`. `key_id` is public (lists, logs, revocation); the
secret is shown once, when the key is created, and only its sha256 is stored. A key is
bound to one tenant or has the admin scope, and carries its own rate limit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, fields
from datetime import datetime

import psycopg

from mm_pipelines.storage.text import storable_text_problem

PREFIX = "mm"
DEFAULT_RATE_PER_MINUTE = 600
DEFAULT_BURST = 60


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str | None  # None: admin scope
    scope: str  # tenant | admin
    name: str
    rate_per_minute: int
    burst: int
    created_at: datetime | None = None
    revoked_at: datetime | None = None

    @property
    def admin(self) -> bool:
        return self.scope == "admin"


_COLUMNS = ", ".join(f.name for f in fields(ApiKey))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    conn: psycopg.Connection,
    tenant: str | None,
    *,
    admin: bool = False,
    name: str = "",
    rate_per_minute: int = DEFAULT_RATE_PER_MINUTE,
    burst: int = DEFAULT_BURST,
) -> tuple[ApiKey, str]:
    """A new key for `tenant` (or the admin scope, tenant None); returns it and the token,
    which is not stored anywhere: give it to its user now."""
    if admin == (tenant is not None):
        raise ValueError("a key has either a tenant or the admin scope")
    for label, value in (("tenant", tenant or ""), ("name", name)):
        if problem := storable_text_problem(value):
            raise ValueError(f"the {label} {problem}")
    if tenant is not None and not tenant.strip():
        raise ValueError("the tenant is empty")
    if rate_per_minute < 1 or burst < 1:
        raise ValueError("rate_per_minute and burst must be at least 1")
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    row = conn.execute(
        f"INSERT INTO api_keys (key_id, secret_sha256, tenant, scope, name, rate_per_minute, "
        f"burst) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
        (key_id, _digest(secret), tenant, "admin" if admin else "tenant", name,
         rate_per_minute, burst),
    ).fetchone()  # fmt: skip
    conn.commit()
    return ApiKey(*row), f"{PREFIX}_{key_id}_{secret}"


def list_keys(conn: psycopg.Connection, tenant: str | None = None) -> list[ApiKey]:
    sql = f"SELECT {_COLUMNS} FROM api_keys"
    rows = (
        conn.execute(f"{sql} WHERE tenant = %s ORDER BY created_at", (tenant,))
        if tenant is not None
        else conn.execute(f"{sql} ORDER BY created_at")
    )
    return [ApiKey(*r) for r in rows]


def revoke_key(conn: psycopg.Connection, key_id: str, tenant: str | None = None) -> bool:
    """Revoke a key (of `tenant`, when given); False when no such active key exists."""
    sql = "UPDATE api_keys SET revoked_at = now() WHERE key_id = %s AND revoked_at IS NULL"
    params: tuple = (key_id,)
    if tenant is not None:
        sql, params = sql + " AND tenant = %s", (key_id, tenant)
    done = conn.execute(sql, params).rowcount == 1
    conn.commit()
    return done


def parse_token(token: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed token, else None."""
    prefix, _, rest = token.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != PREFIX or not key_id or not secret:
        return None
    return key_id, secret


def authenticate(conn: psycopg.Connection, token: str) -> ApiKey | None:
    """The active key this token is, or None (unknown, malformed, wrong secret, revoked)."""
    parts = parse_token(token)
    if parts is None:
        return None
    key_id, secret = parts
    row = conn.execute(
        f"SELECT secret_sha256, {_COLUMNS} FROM api_keys WHERE key_id = %s AND revoked_at IS NULL",
        (key_id,),
    ).fetchone()
    if row is None or not hmac.compare_digest(row[0], _digest(secret)):
        return None
    return ApiKey(*row[1:])
