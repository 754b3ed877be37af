"""The serving app on a real loopback port, in a thread of the test process: real HTTP
(uvicorn), without paying a second process's model imports. Used by the tests of keys and
hostile requests, which need the app's behaviour, not the `mm serve` command line."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from mm_pipelines.storage.vectors import VectorRow, replace_batch
from mm_pipelines_tests.ports import free_port

CAPTIONS = ["a red circle on a blue background", "a green square", "a yellow star"]


def seed_two_tenants(dsn: str, models: Any) -> None:
    """Caption rows for tenants `acme` and `other`, embedded with the bundle's CLIP."""
    from mm_pipelines.storage.postgres import connect

    rows = [
        VectorRow(
            "b1",
            tenant,
            "caption",
            "image",
            f"{tenant}-{i}",
            None,
            f"file:///srv/landing/b1/{tenant}/{i}.png",
            None,
            None,
            None,
            text,
            models.manifest["models"]["clip"]["version"],
            models.projector_version,
            models.embed_text(text),
        )
        for tenant in ("acme", "other")
        for i, text in enumerate(CAPTIONS)
    ]
    with connect(dsn) as conn:
        replace_batch(conn, "b1", rows)


def manager_for(bundle_dir: Path, store_root: Path, cache: Path) -> Any:
    from mm_pipelines.serving.bundles import BundleManager
    from mm_pipelines.serving.runtime import ServingModels
    from mm_pipelines.serving.store import open_store, publish_bundle

    store = open_store(store_root)
    publish_bundle(store, bundle_dir)
    manager = BundleManager(
        store, cache, lambda d: ServingModels.load(d, audio=False, diffusion=False), poll_s=3600
    )
    manager.start()
    return manager


@contextmanager
def serve(app: Any) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(app, port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
