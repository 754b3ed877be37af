"""The API knows who is calling: API keys bound to a tenant (or admin), hashed at rest,
managed with `mm keys`; the tenant comes from the key, never the body; per-key rate limits;
/healthz without secrets or local paths; no landing paths in a tenant's hits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests

from mm_pipelines import cli
from mm_pipelines.serving.app import ConnectionPool, create_app
from mm_pipelines.serving.auth import keys_in
from mm_pipelines.storage import api_keys
from mm_pipelines.storage.postgres import connect
from mm_pipelines_tests.serving.live import CAPTIONS, manager_for, seed_two_tenants, serve

QUERY = CAPTIONS[0]


@pytest.fixture(scope="module")
def dsn(module_pg_dsn, bundle_a) -> str:
    from mm_pipelines.serving.runtime import ServingModels

    seed_two_tenants(module_pg_dsn, ServingModels.load(bundle_a.bundle_dir, audio=False))
    return module_pg_dsn


@pytest.fixture(scope="module")
def manager(bundle_a, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth_store")
    m = manager_for(bundle_a.bundle_dir, root / "store", root / "cache")
    yield m
    m.stop()


@pytest.fixture(scope="module")
def server(manager, dsn) -> Iterator[str]:
    pool = ConnectionPool(lambda: dsn)
    with serve(create_app(manager, pool, keys=keys_in(pool.run))) as url:
        yield url
    pool.close()


def new_key(dsn: str, tenant: str | None, **kwargs) -> str:
    with connect(dsn) as conn:
        return api_keys.create_key(conn, tenant, admin=tenant is None, **kwargs)[1]


def search(server: str, token: str | None, body: dict) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{server}/v1/search", json=body, headers=headers, timeout=60)


def test_a_request_without_a_valid_key_is_refused(server, dsn):
    for token in (None, "mm_000000000000_notasecret", "not-even-a-key"):
        r = search(server, token, {"query": QUERY, "tenant": "acme"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    r = requests.post(f"{server}/v1/embeddings", json={"text": QUERY}, timeout=60)
    assert r.status_code == 401  # every route, not only search
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200  # probes need none


def test_a_key_of_tenant_a_never_sees_b_rows_whatever_the_body_says(server, dsn):
    token = new_key(dsn, "acme")
    bodies = [
        {"query": QUERY},
        {"query": QUERY, "tenant": "acme", "k": 100},
        {"query": QUERY, "batches": ["b1"], "k": 100},
        {"query": "a yellow star", "k": 100, "modalities": ["image"]},
    ]
    for body in bodies:
        r = search(server, token, body)
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]
        assert hits and {h["tenant"] for h in hits} == {"acme"}, body
        assert r.json()["tenant"] == "acme"
    for other in ("other", "ACME", "acme "):
        r = search(server, token, {"query": QUERY, "tenant": other})
        assert r.status_code == 403 and r.json()["error"]["code"] == "tenant_mismatch"


def test_an_admin_key_names_the_tenant_in_the_body(server, dsn):
    token = new_key(dsn, None)
    r = search(server, token, {"query": QUERY, "tenant": "other", "k": 3})
    assert r.status_code == 200 and {h["tenant"] for h in r.json()["hits"]} == {"other"}
    assert r.json()["hits"][0]["source_uri"].startswith("file://")  # admins see where
    r = search(server, token, {"query": QUERY})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_field"


def test_a_tenants_hits_carry_no_landing_paths(server, dsn):
    r = search(server, new_key(dsn, "acme"), {"query": QUERY, "k": 3})
    assert r.status_code == 200
    assert "file://" not in r.text and "/srv/landing" not in r.text
    first = r.json()["hits"][0]
    assert first["source_name"] == "acme/0.png" and first["content_hash"] == "acme-0"


def test_keys_are_hashed_at_rest(dsn):
    token = new_key(dsn, "acme")
    key_id, secret = api_keys.parse_token(token)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT * FROM api_keys WHERE key_id = %s", (key_id,)).fetchone()
    assert secret not in repr(row) and hashlib.sha256(secret.encode()).hexdigest() in row


def test_mm_keys_creates_lists_and_revokes_and_a_revoked_key_is_refused_at_once(
    server, dsn, monkeypatch, capsys
):
    monkeypatch.setenv("MM_PG_DSN", dsn)
    assert cli.main(["keys", "create", "--tenant", "acme", "--name", "ci"]) == 0
    token = capsys.readouterr().out.strip()
    assert search(server, token, {"query": QUERY}).status_code == 200
    key_id = api_keys.parse_token(token)[0]
    assert cli.main(["keys", "list", "--tenant", "acme"]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and "active" in listed and token not in listed
    assert cli.main(["keys", "revoke", key_id]) == 0
    r = search(server, token, {"query": QUERY})  # the very next request
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert cli.main(["keys", "list", "--tenant", "acme"]) == 0
    assert "revoked" in capsys.readouterr().out


def test_a_burst_beyond_the_limit_gets_429_and_the_server_stays_healthy(server, dsn):
    limited = new_key(dsn, "acme", rate_per_minute=1, burst=3)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: search(server, limited, {"query": QUERY}), range(16)))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) == 3 and codes.count(429) == 13, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60  # one token a minute
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200
    other = new_key(dsn, "acme")  # limits are per key: another key is served
    assert search(server, other, {"query": QUERY}).status_code == 200


def test_healthz_shows_no_secrets_or_local_paths(server, manager):
    r = requests.get(f"{server}/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["bundle_version"] == "bundle-a"
    assert "store" not in r.json()
    assert str(manager.cache_dir) not in r.text and "/tmp" not in r.text


def test_without_keys_the_tenant_comes_from_the_body(manager, dsn):
    """`mm serve --no-auth` (the demo): no key needed, the body names the tenant."""
    pool = ConnectionPool(lambda: dsn)
    with serve(create_app(manager, pool)) as url:
        r = search(url, None, {"query": QUERY, "tenant": "other", "k": 2})
    pool.close()
    assert r.status_code == 200 and {h["tenant"] for h in r.json()["hits"]} == {"other"}
