"""The serving API never returns what curation hides: a flagged item (and a near-duplicate
that is not its group's keeper) leaves `/v1/search` of its tenant, over real HTTP (the app
under uvicorn, in this process), while another tenant's copy of the same content stays."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from mm_pipelines.storage import curation
from mm_pipelines.storage.postgres import connect

QUERY = "a red circle on a blue background"
OTHER = "a green square on a white background"


@pytest.fixture(scope="module")
def catalog(module_pg_dsn, bundle_a) -> str:
    """Index rows embedded with bundle A: per tenant, a red image (pixels + caption) and a
    green one."""
    from mm_pipelines.serving.runtime import ServingModels
    from mm_pipelines.storage.vectors import VectorRow, replace_batch

    models = ServingModels.load(bundle_a.bundle_dir, audio=False, diffusion=False)
    clip = models.manifest["models"]["clip"]["version"]

    def row(tenant: str, kind: str, content: str, parent: str | None, text: str) -> VectorRow:
        return VectorRow(
            "b1", tenant, kind, "image", content, parent, f"file:///{tenant}/{content}.png",
            None, None, None, text, clip, models.projector_version, models.embed_text(text),
        )  # fmt: skip

    rows = [
        r
        for tenant in ("acme", "globex")
        for r in (
            row(tenant, "image", "red", None, QUERY),
            row(tenant, "caption", "red-caption", "red", QUERY),
            row(tenant, "image", "green", None, OTHER),
        )
    ]
    with connect(module_pg_dsn) as conn:
        replace_batch(conn, "b1", rows)
    return module_pg_dsn


@pytest.fixture(scope="module")
def url(tmp_path_factory, catalog, bundle_a) -> Iterator[str]:
    import uvicorn

    from mm_pipelines.serving.app import ConnectionPool, create_app
    from mm_pipelines.serving.bundles import BundleManager
    from mm_pipelines.serving.runtime import ServingModels
    from mm_pipelines.serving.store import open_store, publish_bundle

    root = tmp_path_factory.mktemp("curation_serving")
    store = open_store(root / "store")
    publish_bundle(store, bundle_a.bundle_dir)
    manager = BundleManager(
        store,
        root / "cache",
        lambda path: ServingModels.load(path, audio=False, diffusion=False),
        poll_s=3600,
    )
    assert manager.refresh()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(create_app(manager, ConnectionPool(lambda: catalog, 2)), log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


def _found(url: str, tenant: str) -> set[str]:
    r = requests.post(
        f"{url}/v1/search", json={"query": QUERY, "tenant": tenant, "k": 5}, timeout=60
    )
    assert r.status_code == 200, r.text
    return {h["content_hash"] for h in r.json()["hits"]}


def test_a_flagged_item_leaves_the_served_search_of_its_tenant_only(url, catalog):
    # the caption row folds into its image's hit: "red" stays while either row is served
    assert "red" in _found(url, "acme")
    with connect(catalog) as conn:
        flag = curation.FlagRow(
            "acme", "red", "unsafe", 0.97, 0.5, "unsafe 0.970 >= 0.5", "head-unsafe@test", {}, "b1"
        )
        curation.replace_flags(conn, "b1", [("acme", "red")], [flag])
    assert _found(url, "acme") == {"green"}  # the image and its caption row, both gone
    assert "red" in _found(url, "globex")  # same content, other tenant


def test_a_near_duplicate_that_is_not_kept_leaves_the_served_search(url, catalog):
    with connect(catalog) as conn:
        curation.replace_groups(conn, "globex", {"red": ("green", 2), "green": ("green", 2)}, "t")
    assert _found(url, "globex") == {"green"}
