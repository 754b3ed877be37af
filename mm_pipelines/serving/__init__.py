"""Online serving: export approved models into a verified bundle, publish it atomically
into the serving store, and answer HTTP requests with it (plain Python, no Dagster).

- ``export.export_bundle``: models -> a self-contained bundle folder (TorchScript +
  safetensors + fused diffusers pipeline + manifest), verified in a fresh process.
- ``store``: ``open_store``, ``publish_bundle``, ``current_version``, ``rollback``,
  ``read_history`` / ``replaced_at``, ``fetch_bundle``. Rollback one-liner:
  ``python -m mm_pipelines.serving.store [--store S] rollback BUNDLE_VERSION``.
- ``runtime.ServingModels``: load a bundle; embed text / image / audio, search, generate.
- ``server.main``: ``mm serve`` (uvicorn + the Starlette app of ``app``), with hot bundle
  swaps from ``bundles.BundleManager``.
"""
