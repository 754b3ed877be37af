"""The server's current bundle, swapped without a restart.

A poller thread reads CURRENT every ``poll_s`` seconds (and sooner when a request
notices that ``poll_s`` has passed since the last look: a cheap, non-blocking nudge).
A new version is fetched, verified against its manifest, loaded and self-checked against
its recorded bounds entirely in the background; only then is ``current`` replaced, in
one reference assignment. A request takes ``current`` once at its start and uses that
object to the end, so it finishes on the bundle it started with and never sees two.
A bundle that fails to load is reported in /healthz and retried after ``retry_s``;
the previous bundle keeps serving meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mm_pipelines.serving.manifest import BundleIntegrityError
from mm_pipelines.serving.runtime import ServingModels
from mm_pipelines.serving.store import ServingStore, current_version, fetch_bundle

log = logging.getLogger(__name__)

Loader = Callable[[Path], ServingModels]


class BundleManager:
    def __init__(
        self,
        store: ServingStore,
        cache_dir: str | Path,
        loader: Loader,
        poll_s: float = 5.0,
        retry_s: float = 60.0,
    ) -> None:
        self.store = store
        self.cache_dir = Path(cache_dir)
        self.loader = loader
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.current: ServingModels | None = None
        self.loaded_at: float | None = None
        self.failures: dict[str, tuple[float, str]] = {}  # version -> (when, why)
        self._last_check = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._refresh_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Load the current bundle now (if any), then poll in a daemon thread."""
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="bundle-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def nudge(self) -> None:
        """Per request: wake the poller if ``poll_s`` passed since its last look."""
        if time.monotonic() - self._last_check >= self.poll_s:
            self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("bundle poll failed")

    def refresh(self) -> bool:
        """Look at CURRENT; load and swap in a new version. True if a swap happened."""
        with self._refresh_lock:
            self._last_check = time.monotonic()
            try:
                version = current_version(self.store)
            except Exception as err:  # noqa: BLE001 - a store outage must not stop serving
                log.warning("cannot read %s: %s", self.store.uri("CURRENT"), err)
                return False
            loaded = self.current.version if self.current is not None else None
            if version is None or version == loaded:
                return False
            failed = self.failures.get(version)
            if failed and time.monotonic() - failed[0] < self.retry_s:
                return False
            try:
                t0 = time.perf_counter()
                models = self.loader(fetch_bundle(self.store, version, self.cache_dir))
            except Exception as err:  # noqa: BLE001 - keep serving the previous bundle
                if isinstance(err, BundleIntegrityError):  # expected: no traceback needed
                    log.error("bundle %s refused: %s", version, err)
                else:
                    log.exception("bundle %s refused", version)
                self.failures[version] = (time.monotonic(), f"{type(err).__name__}: {err}")
                return False
            self.failures.pop(version, None)
            self.current = models  # the swap: one reference assignment
            self.loaded_at = time.time()
            log.info("serving bundle %s (loaded in %.1f s)", version, time.perf_counter() - t0)
            return True

    def status(self) -> dict[str, Any]:
        return {
            "store": self.store.uri(),
            "poll_seconds": self.poll_s,
            "loaded_at": self.loaded_at,
            "failed_bundles": {v: why for v, (_, why) in self.failures.items()},
        }


def default_loader(audio: bool = True, diffusion: bool = True, self_check: bool = True) -> Loader:
    """Load (checksums verified) and run the bundle's own reference check: a bundle that
    does not reproduce its training-side outputs here (another torch, another CPU) is
    refused before it serves anything."""

    def load(bundle_dir: Path) -> ServingModels:
        models = ServingModels.load(bundle_dir, audio=audio, diffusion=diffusion)
        if self_check:
            models.check_bounds(models.self_check())
        return models

    return load
