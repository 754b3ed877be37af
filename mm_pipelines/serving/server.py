"""``mm serve``: the serving API under uvicorn, on the current bundle of a serving store.

    mm serve [--store PATH|s3://bucket/prefix] [--host 127.0.0.1] [--port 8000] [--dsn DSN]
             [--no-auth]

Serves the API (serving/app.py; /openapi.json describes it) and the search page on `/`.

``--port 0`` picks a free port. The first stdout line is
``mm serve: listening on http://HOST:PORT (bundle VERSION)`` (VERSION is ``none`` until a
bundle is published; the server then picks it up by itself). Every request but /healthz
needs an API key (``mm keys create --tenant T``) unless ``--no-auth`` is given.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from mm_pipelines import settings


def build_parser() -> argparse.ArgumentParser:
    from mm_pipelines.helpformat import Defaults
    from mm_pipelines.serving.app import Limits

    p = argparse.ArgumentParser(
        prog="mm serve",
        description=__doc__.split("\n\n")[0],
        formatter_class=Defaults,
    )
    p.add_argument(
        "--store",
        default=settings.serving_store(),
        help="serving store: a folder or s3://bucket/prefix (default: MM_SERVING_STORE, "
        "else $MM_HOME/serving; here %(default)s)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument(
        "--dsn",
        default=settings.pg_dsn(),
        help="catalog for /v1/search and /v1/media (env MM_PG_DSN; default: the embedded server)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="local copies of S3 bundles (default: $MM_HOME/serving-cache)",
    )
    p.add_argument("--poll-seconds", type=float, default=5.0, help="how often to look at CURRENT")
    p.add_argument("--workers", type=int, default=None, help="model threads (default: one per CPU)")
    p.add_argument("--torch-threads", type=int, default=1, help="intra-op threads per request")
    limits = Limits()
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help=f"largest request body (default: {limits.max_body_bytes})",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help=f"largest image to decode (default: {limits.max_image_pixels})",
    )
    p.add_argument(
        "--max-audio-seconds",
        type=float,
        default=None,
        help=f"longest audio query (default: {limits.max_audio_seconds})",
    )
    p.add_argument(
        "--body-timeout-s",
        type=float,
        default=None,
        help=f"a slower request body gets 408 (default: {limits.body_timeout_s})",
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="no API keys: the tenant comes from the request body (local demos only)",
    )
    p.add_argument("--no-audio", action="store_true", help="do not load Whisper")
    p.add_argument("--no-diffusion", action="store_true", help="do not load the generator")
    p.add_argument("--no-self-check", action="store_true", help="skip the load-time check")
    p.add_argument(
        "--no-media",
        action="store_true",
        help="do not serve media bytes (/v1/media; the search page shows no thumbnails)",
    )
    p.add_argument("--log-level", default="info", help="uvicorn/logging level")
    return p


def _limits(args: argparse.Namespace):
    from mm_pipelines.serving.app import Limits

    given = {
        "max_body_bytes": args.max_body_bytes,
        "max_image_pixels": args.max_image_pixels,
        "max_audio_seconds": args.max_audio_seconds,
        "body_timeout_s": args.body_timeout_s,
    }
    return Limits(**{k: v for k, v in given.items() if v is not None})


def _dsn_factory(dsn: str | None):
    def resolve() -> str:
        if dsn:
            return dsn
        from mm_pipelines.storage.postgres import embedded_dsn

        return embedded_dsn(settings.embedded_pg_dir())

    return resolve


def _media_store():
    """The media store the pipeline writes (MM_S3_BUCKET, else $MM_HOME/media)."""
    from mm_pipelines.pipeline.services import Services

    return Services.from_settings().media


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import torch
    import uvicorn

    from mm_pipelines.serving.app import ConnectionPool, create_app
    from mm_pipelines.serving.auth import keys_in
    from mm_pipelines.serving.bundles import BundleManager, default_loader
    from mm_pipelines.serving.store import open_store

    # many small requests in parallel: one intra-op thread each beats contended pools
    torch.set_num_threads(max(1, args.torch_threads))
    store = open_store(args.store or str(settings.mm_home() / "serving"))
    cache_dir = args.cache_dir or str(settings.mm_home() / "serving-cache")
    loader = default_loader(
        audio=not args.no_audio, diffusion=not args.no_diffusion, self_check=not args.no_self_check
    )
    manager = BundleManager(store, cache_dir, loader, poll_s=args.poll_seconds)
    manager.start()
    pool = ConnectionPool(_dsn_factory(args.dsn), size=max(4, (args.workers or 0)))
    keys = None if args.no_auth else keys_in(pool.run)
    media = None if args.no_media else _media_store()
    app = create_app(manager, pool, _limits(args), workers=args.workers, keys=keys, media=media)

    # bind here so that --port 0 can report the port it got before serving starts
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections queue here until uvicorn accepts: none is refused
    host, port = sock.getsockname()[:2]
    version = manager.current.version if manager.current else "none"
    print(f"mm serve: listening on http://{host}:{port} (bundle {version})", flush=True)
    if args.no_auth:
        print("mm serve: API keys are OFF (--no-auth): any caller names any tenant", flush=True)
    config = uvicorn.Config(
        app, log_level=args.log_level.lower(), access_log=False, timeout_graceful_shutdown=10
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        manager.stop()
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
