"""`mm serve` as a real process on loopback: every endpoint, bad input, bundle switches.

One server for the module (starting it costs the model imports). The switch tests
publish bundle B into its store and then roll back, so they run last, in file order.
Requests carry API keys (created in the catalog, as `mm keys create` does): the admin key
unless a test is about one tenant's key. Keys themselves are tested in test_auth.py.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from io import BytesIO

import numpy as np
import pytest
import requests
from PIL import Image

from mm_pipelines_tests.serving.conftest import child_env, png_bytes, wav_bytes

LIMITS = {"max_body_bytes": 200_000, "max_image_pixels": 100_000, "max_audio_seconds": 2.0}
QUERY = "a red circle on a blue background"


@pytest.fixture(scope="module")
def catalog(module_pg_dsn, bundle_a) -> dict[str, str]:
    """A few index rows embedded with bundle A, for two tenants."""
    from mm_pipelines.serving.runtime import ServingModels
    from mm_pipelines.storage.postgres import connect
    from mm_pipelines.storage.vectors import VectorRow, replace_batch

    models = ServingModels.load(bundle_a.bundle_dir, audio=False, diffusion=False)
    captions = [QUERY, "a green square on a white background", "a yellow star"]
    rows = [
        VectorRow(
            "b1",
            tenant,
            "caption",
            "image",
            f"{tenant}-{i}",
            None,
            f"file:///{tenant}/{i}.png",
            None,
            None,
            None,
            text,
            models.manifest["models"]["clip"]["version"],
            models.projector_version,
            models.embed_text(text),
        )
        for tenant in ("acme", "other")
        for i, text in enumerate(captions)
    ]
    with connect(module_pg_dsn) as conn:
        replace_batch(conn, "b1", rows)
    return {"dsn": module_pg_dsn}


TOKENS: dict[str, str] = {}  # "admin" / "acme" -> API key, filled by the `server` fixture


def auth(key: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[key]}"}


@pytest.fixture(scope="module")
def keys(catalog) -> dict[str, str]:
    from mm_pipelines.storage import api_keys
    from mm_pipelines.storage.postgres import connect

    with connect(catalog["dsn"]) as conn:
        # the switch test fires requests as fast as four threads can: a load-test client's
        # limit (rate limits are tested in test_auth.py)
        TOKENS["admin"] = api_keys.create_key(
            conn, None, admin=True, rate_per_minute=10**6, burst=10**5
        )[1]
        TOKENS["acme"] = api_keys.create_key(conn, "acme")[1]
    return TOKENS


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, bundle_a):
    from mm_pipelines.serving.store import open_store, publish_bundle

    root = tmp_path_factory.mktemp("serving_store")
    publish_bundle(open_store(root), bundle_a.bundle_dir)
    return root


@pytest.fixture(scope="module")
def server(store_dir, catalog, keys, tmp_path_factory) -> Iterator[str]:
    args = [
        sys.executable, "-m", "mm_pipelines.serving.server",
        "--store", str(store_dir), "--port", "0", "--dsn", catalog["dsn"],
        "--poll-seconds", "0.5", "--cache-dir", str(tmp_path_factory.mktemp("cache")),
        "--log-level", "warning",
    ]  # fmt: skip
    for name, value in LIMITS.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w+")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=child_env())
    try:
        line = proc.stdout.readline()  # blocks until bound (or the process died)
        assert "listening on" in line, f"server did not start: {line!r}"
        url = line.split("listening on ", 1)[1].split()[0]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        text = log.read()
        assert "Traceback" not in text, text[-3000:]  # no request ever crashed the server


@pytest.fixture(scope="module")
def local_a(bundle_a):
    from mm_pipelines.serving.runtime import ServingModels

    return ServingModels.load(bundle_a.bundle_dir, diffusion=False)


def post(url: str, path: str, body, key: str = "admin", **kwargs) -> requests.Response:
    data = json.dumps(body) if isinstance(body, dict) else body  # bytes / a chunk iterator
    return requests.post(url + path, data=data, timeout=60, headers=auth(key), **kwargs)


def test_healthz_names_the_bundle_and_models(server):
    r = requests.get(server + "/healthz", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["bundle_version"] == "bundle-a" == r.headers["X-Bundle-Version"]
    assert {"clip", "projector", "whisper", "diffusion"} <= set(body["models"])
    assert body["models"]["clip"]["registered_version"] == "3"


@pytest.mark.parametrize("kind", ["text", "image", "audio"])
def test_embeddings_equal_the_runtime_vectors(server, local_a, kind):
    payload = {
        "text": {"input": QUERY},
        "image": {"image_base64": base64.b64encode(png_bytes(60, 40)).decode()},
        "audio": {"audio_base64": base64.b64encode(wav_bytes(1.0)).decode()},
    }[kind]
    want = {
        "text": lambda: local_a.embed_text(QUERY),
        "image": lambda: local_a.embed_image(png_bytes(60, 40)),
        "audio": lambda: local_a.embed_audio(wav_bytes(1.0)),
    }[kind]()
    r = post(server, "/v1/embeddings", payload)
    assert r.status_code == 200, r.text
    body = r.json()
    (item,) = body["data"]  # OpenAI's shape: a list of {"object", "index", "embedding"}
    assert body["bundle_version"] == "bundle-a" and len(item["embedding"]) == len(want)
    assert np.abs(np.asarray(item["embedding"]) - want).max() < 1e-5


def test_search_finds_the_caption_for_the_tenant_only(server):
    r = post(server, "/v1/search", {"query": QUERY, "tenant": "acme", "k": 2}, key="acme")
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 2 and {h["tenant"] for h in hits} == {"acme"}
    assert hits[0]["text"] == QUERY and hits[0]["cosine"] > 0.999
    r = post(
        server, "/v1/search", {"query": QUERY, "tenant": "acme", "modalities": ["audio"]}, "acme"
    )
    assert r.status_code == 200 and r.json()["hits"] == []


def test_generation_returns_a_png_for_the_seed(server):
    body = {"prompt": "a red circle", "seed": 3, "steps": 2}
    first = post(server, "/v1/images/generations", body)
    assert first.status_code == 200, first.text
    (item,) = first.json()["data"]  # OpenAI's shape: [{"b64_json": ...}]
    image = Image.open(BytesIO(base64.b64decode(item["b64_json"])))
    assert image.format == "PNG" and image.size == (32, 32)
    again = post(server, "/v1/images/generations", body).json()
    assert again["data"][0]["b64_json"] == item["b64_json"]  # same seed, same image
    assert again["bundle_version"] == "bundle-a"


BAD_REQUESTS = [
    ("/v1/search", {"query": QUERY}, 400, "missing_field"),  # no tenant
    ("/v1/search", {"query": QUERY, "tenant": "  "}, 400, "bad_field"),
    ("/v1/search", {"query": QUERY, "tenant": "acme", "k": 10_000}, 400, "bad_field"),
    ("/v1/search", {"query": QUERY, "tenant": "acme", "modalities": ["smell"]}, 400, "bad_field"),
    ("/v1/embeddings", b"{not json", 400, "bad_json"),
    ("/v1/embeddings", b"[1, 2]", 400, "bad_json"),
    ("/v1/embeddings", {"text": "x" * 300_000}, 413, "body_too_large"),
    ("/v1/embeddings", {"text": 5}, 400, "bad_field"),
    ("/v1/embeddings", {"text": "   "}, 400, "empty_text"),
    ("/v1/embeddings", {"text": "a", "image_base64": "AAAA"}, 400, "bad_input"),
    ("/v1/embeddings", {"image_base64": "!!notbase64"}, 400, "bad_base64"),
    ("/v1/embeddings", {"image_base64": base64.b64encode(b"GIF89a but not").decode()}, 400,
     "bad_image"),
    ("/v1/embeddings", {"image_base64": base64.b64encode(png_bytes(400, 400)).decode()}, 413,
     "image_too_large"),
    ("/v1/embeddings", {"audio_base64": base64.b64encode(b"\x00" * 1000).decode()}, 400,
     "bad_audio"),
    ("/v1/embeddings", {"audio_base64": base64.b64encode(wav_bytes(3.0)).decode()}, 413,
     "audio_too_long"),
    ("/v1/images/generations", {"prompt": "x", "steps": 500}, 400, "bad_field"),
    ("/v1/images/generations", {"seed": 1}, 400, "missing_field"),
    ("/v1/nothing", {}, 404, "not_found"),
]  # fmt: skip


def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(server):
    for path, body, status, code in BAD_REQUESTS:
        r = post(server, path, body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, r.text)
        assert "Traceback" not in r.text and "/tmp" not in r.text
    r = requests.get(server + "/v1/embeddings", timeout=10, headers=auth())  # wrong method
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    chunked = post(server, "/v1/embeddings", iter([b'{"text": "', b"y" * 250_000, b'"}']))
    assert chunked.status_code == 413  # no Content-Length: counted while streaming
    assert post(server, "/v1/embeddings", {"text": QUERY}).status_code == 200
    assert requests.get(server + "/healthz", timeout=10).status_code == 200


def _wait_for_version(server: str, version: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if requests.get(server + "/healthz", timeout=10).json().get("bundle_version") == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"server never switched to {version}")


def test_bundle_switch_under_concurrent_requests(server, store_dir, bundle_b, local_a):
    """Threads embed while bundle B is published: no request fails, each response names
    one bundle and carries that bundle's vector, and no thread goes back to A."""
    from mm_pipelines.serving.runtime import ServingModels
    from mm_pipelines.serving.store import open_store, publish_bundle

    want = {
        "bundle-a": local_a.embed_text(QUERY),
        "bundle-b": ServingModels.load(bundle_b.bundle_dir, audio=False).embed_text(QUERY),
    }
    assert np.abs(want["bundle-a"] - want["bundle-b"]).max() > 0.01  # a switch is visible
    stop = threading.Event()
    results: list[list[tuple[int, str | None, list[float] | None]]] = [[] for _ in range(4)]

    def fire(out: list) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    r = session.post(
                        server + "/v1/embeddings", json={"text": QUERY}, timeout=60, headers=auth()
                    )
                    body = r.json()
                    vec = body["data"][0]["embedding"] if "data" in body else None
                    out.append((r.status_code, body.get("bundle_version"), vec))
                except Exception as err:  # noqa: BLE001 - a failed request is the finding
                    out.append((0, repr(err), None))

    threads = [threading.Thread(target=fire, args=(r,)) for r in results]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        publish_bundle(open_store(store_dir), bundle_b.bundle_dir)
        _wait_for_version(server, "bundle-b")
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    flat = [r for per_thread in results for r in per_thread]
    assert flat and all(status == 200 for status, _, _ in flat), {r[:2] for r in flat}
    assert {v for _, v, _ in flat} == {"bundle-a", "bundle-b"}
    for _, version, vec in flat:
        assert np.abs(np.asarray(vec) - want[version]).max() < 1e-5
    for per_thread in results:
        versions = [v for _, v, _ in per_thread]
        assert versions == sorted(versions)  # a..., b...: never back to A


def test_rollback_is_served_without_a_restart(server, store_dir):
    from mm_pipelines.serving.store import open_store, rollback

    rollback(open_store(store_dir), "bundle-a")
    _wait_for_version(server, "bundle-a")
    r = post(server, "/v1/embeddings", {"text": QUERY})
    assert r.status_code == 200 and r.json()["bundle_version"] == "bundle-a"


def test_a_corrupted_bundle_is_refused_and_the_old_one_keeps_serving(
    server, store_dir, bundle_b, tmp_path
):
    import shutil

    from mm_pipelines.serving.manifest import read_manifest, write_manifest
    from mm_pipelines.serving.store import open_store, publish_bundle, rollback

    copy = tmp_path / "c"
    shutil.copytree(bundle_b.bundle_dir, copy)
    write_manifest(copy, {**read_manifest(copy), "bundle_version": "bundle-c"})
    store = open_store(store_dir)
    publish_bundle(store, copy, make_current=False)
    damaged = store_dir / "bundles" / "bundle-c" / "projector" / "audio_head.ts"
    damaged.write_bytes(damaged.read_bytes()[:-10])  # bit rot after publication
    rollback(store, "bundle-c")  # CURRENT now names it
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        health = requests.get(server + "/healthz", timeout=10).json()
        if "bundle-c" in health["failed_bundles"]:
            break
        time.sleep(0.2)
    assert "projector/audio_head.ts" in health["failed_bundles"]["bundle-c"]
    assert health["bundle_version"] == "bundle-a"
    r = post(server, "/v1/embeddings", {"text": QUERY})
    assert r.status_code == 200 and r.json()["bundle_version"] == "bundle-a"
