"""Errors of our own infrastructure, told apart from errors of the input.

A disk that is full or read-only, a store or landing area we may not write or read, an
S3 endpoint or a database that does not answer: none of these is a file's fault, so none
may become a quarantine row (a row keeps its fingerprint, and every later run would skip
the file). They fail the step instead, with a message that names the service and says
that a re-run after the fix picks everything up.
"""

from __future__ import annotations

import errno

# a local disk that will not take (or give) bytes: waiting seconds will not fix these
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENOMEM})


class InfrastructureError(RuntimeError):
    """A service or disk of ours failed, not the input. `retriable`: whether retrying the
    step in seconds may help (a network blip) or not (a full or read-only disk)."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


def is_disk_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_ERRNOS


def is_network_error(err: BaseException) -> bool:
    """Errors of the S3 client talking to its endpoint (any botocore error: connection,
    timeout, access denied), or of a database connection."""
    module = type(err).__module__ or ""
    if module.startswith(("botocore", "boto3", "urllib3", "s3transfer")):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(err, psycopg.OperationalError)


def classify(err: BaseException, where: str) -> InfrastructureError | None:
    """The InfrastructureError `err` amounts to (`where` names the service), or None when
    `err` may well be the input's fault."""
    if is_disk_error(err):
        return InfrastructureError(f"{where}: {err}", retriable=False)
    if isinstance(err, PermissionError):
        return InfrastructureError(f"{where}: permission denied ({err})", retriable=False)
    if is_network_error(err):
        return InfrastructureError(f"{where}: {type(err).__name__}: {err}", retriable=True)
    return None
