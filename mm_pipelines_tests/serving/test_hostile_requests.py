"""Hostile requests get a 4xx with a clear message, never a 500: bodies nested beyond
Python's recursion limit, NUL characters and lone surrogates in any text field, uploads
that stall; and a Postgres restart costs no failed request."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import psycopg
import pytest
import requests

from mm_pipelines.serving.app import ConnectionPool, Limits, create_app
from mm_pipelines_tests.serving.live import CAPTIONS, manager_for, seed_two_tenants, serve

QUERY = CAPTIONS[0]


@pytest.fixture(scope="module")
def dsn(module_pg_dsn, bundle_a) -> str:
    from mm_pipelines.serving.runtime import ServingModels

    seed_two_tenants(module_pg_dsn, ServingModels.load(bundle_a.bundle_dir, audio=False))
    return module_pg_dsn


@pytest.fixture(scope="module")
def pool(dsn) -> Iterator[ConnectionPool]:
    p = ConnectionPool(lambda: dsn)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(bundle_a, pool, tmp_path_factory) -> Iterator[str]:
    """Without keys (test_auth.py covers them): the inputs here are the point."""
    root = tmp_path_factory.mktemp("hostile_store")
    manager = manager_for(bundle_a.bundle_dir, root / "store", root / "cache")
    with serve(create_app(manager, pool, Limits(body_timeout_s=1.0))) as url:
        yield url
    manager.stop()


def raw_post(server: str, path: str, body: bytes) -> requests.Response:
    return requests.post(
        server + path, data=body, headers={"Content-Type": "application/json"}, timeout=60
    )


HOSTILE = [
    ("/v1/search", b"[" * 100_000, "bad_json", "nested too deeply"),
    ("/v1/search", b'{"query": "x", "tenant": "acme\\u0000"}', "bad_text", "'tenant'"),
    ("/v1/search", b'{"query": "x", "tenant": "acme", "batches": ["b1\\u0000"]}', "bad_text",
     "'batches[0]'"),
    ("/v1/search", b'{"query": "x", "tenant": "\\ud800"}', "bad_text", "surrogate"),
    ("/v1/search", b'{"query": "a \\ud800 b", "tenant": "acme"}', "bad_text", "'query'"),
    ("/v1/images/generations", b'{"prompt": "a \\udfff cat"}', "bad_text", "'prompt'"),
    ("/v1/embeddings", b'{"text": "\\u0000"}', "bad_text", "NUL"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "code", "says"), HOSTILE)
def test_hostile_input_is_a_400_with_a_clear_message(server, path, body, code, says):
    r = raw_post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code and says in r.json()["error"]["message"]
    assert requests.get(server + "/healthz", timeout=10).status_code == 200


def test_a_stalled_upload_is_answered_408_and_closed(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        head = (
            "POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n"
        )
        conn.sendall(head.encode() + b'{"query": "')  # ... and then nothing more
        started = time.monotonic()
        answer = conn.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408") and "body_timeout" in answer
    assert time.monotonic() - started < 20  # the 1 s limit, not forever


def test_a_postgres_restart_costs_no_failed_request(server, pool, dsn):
    body = {"query": QUERY, "tenant": "acme", "k": 2}
    assert requests.post(server + "/v1/search", json=body, timeout=60).status_code == 200
    # every pooled connection is cut, as a restart of the server does
    with psycopg.connect(dsn, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    assert killed >= 1
    r = requests.post(server + "/v1/search", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert {h["tenant"] for h in r.json()["hits"]} == {"acme"}
