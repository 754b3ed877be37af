"""Content-addressed object store for media: a local folder or an S3 bucket.

Objects are keyed by the sha256 of their bytes, so identical content from several
sources is stored once and a re-run never copies an object twice.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, BinaryIO

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class MediaIntegrityError(RuntimeError):
    """A stored object's bytes do not hash to its key."""


def object_key(content_hash: str) -> str:
    # two levels of fan-out keep directory listings small at millions of objects
    return f"{content_hash[:2]}/{content_hash[2:4]}/{content_hash}"


class MediaStore(ABC):
    @property
    @abstractmethod
    def location(self) -> str:
        """Where the store is (a folder or s3://bucket/prefix), for messages."""

    @abstractmethod
    def uri(self, content_hash: str) -> str: ...

    @abstractmethod
    def exists(self, content_hash: str) -> bool: ...

    @abstractmethod
    def put_file(self, path: str | Path, content_hash: str) -> bool:
        """Store the file under its hash; False if the object was already there. Of two
        writers of the same content at the same time exactly one gets True."""

    @abstractmethod
    def open(self, content_hash: str) -> BinaryIO: ...

    @abstractmethod
    def local_path(self, content_hash: str) -> Path:
        """A local file with the object's bytes, for decoders that need a path."""

    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        content_hash = sha256_bytes(data)
        if self.exists(content_hash):
            return content_hash, False
        with tempfile.NamedTemporaryFile(delete=False) as tmp:
            tmp.write(data)
        try:
            return content_hash, self.put_file(tmp.name, content_hash)
        finally:
            os.unlink(tmp.name)

    def read_bytes(self, content_hash: str) -> bytes:
        with self.open(content_hash) as f:
            return f.read()

    def verify(self, content_hash: str) -> str | None:
        """None if the object exists with this hash, else the reason it does not."""
        if not self.exists(content_hash):
            return "missing"
        with self.open(content_hash) as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        return None if actual == content_hash else f"hash mismatch: stored bytes hash to {actual}"


class LocalMediaStore(MediaStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self._tmp = self.root / ".incoming"
        self._tmp.mkdir(parents=True, exist_ok=True)

    @property
    def location(self) -> str:
        return str(self.root)

    def path(self, content_hash: str) -> Path:
        return self.root / object_key(content_hash)

    def uri(self, content_hash: str) -> str:
        return self.path(content_hash).as_uri()

    def exists(self, content_hash: str) -> bool:
        return self.path(content_hash).is_file()

    def put_file(self, path: str | Path, content_hash: str) -> bool:
        final = self.path(content_hash)
        if final.is_file():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        # copy to a private name, then link it in: readers never see half an object, and
        # link() fails for all but the first of concurrent writers (which rename() would
        # not), so only one counts the object as new
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            _link_once(tmp, final)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def open(self, content_hash: str) -> BinaryIO:
        return open(self.path(content_hash), "rb")

    def local_path(self, content_hash: str) -> Path:
        return self.path(content_hash)


def _link_once(tmp: str, final: Path) -> None:
    """Make `final` the bytes of `tmp`; FileExistsError if another writer was first."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as err:  # a file system without hard links: rename, first check wins
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if final.is_file():
            raise FileExistsError(str(final)) from err
        shutil.copyfile(tmp, f"{tmp}.final")
        os.replace(f"{tmp}.final", final)


class S3MediaStore(MediaStore):
    """Objects under `s3://bucket/prefix/<fan-out>/<sha256>`; any S3-compatible endpoint."""

    def __init__(self, client: Any, bucket: str, prefix: str = "media", cache_dir: str | Path = ""):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "mm-media-cache"
        self.cache_dir = cache.expanduser().resolve()

    @property
    def location(self) -> str:
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {endpoint}" if endpoint else where

    def key(self, content_hash: str) -> str:
        return (
            f"{self.prefix}/{object_key(content_hash)}" if self.prefix else object_key(content_hash)
        )

    def uri(self, content_hash: str) -> str:
        return f"s3://{self.bucket}/{self.key(content_hash)}"

    def exists(self, content_hash: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(content_hash))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def put_file(self, path: str | Path, content_hash: str) -> bool:
        if self.exists(content_hash):
            return False
        self.client.upload_file(
            str(path),
            self.bucket,
            self.key(content_hash),
            ExtraArgs={"Metadata": {"sha256": content_hash}},
        )
        return True

    def open(self, content_hash: str) -> BinaryIO:
        return open(self.local_path(content_hash), "rb")

    def local_path(self, content_hash: str) -> Path:
        """A verified local copy: the key is the sha256, so a changed byte is refused
        (and never cached) instead of being decoded as if it were the object."""
        target = self.cache_dir / object_key(content_hash)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    self.client.download_fileobj(self.bucket, self.key(content_hash), f)
                actual = sha256_file(tmp)
                if actual != content_hash:
                    raise MediaIntegrityError(
                        f"{self.uri(content_hash)} has sha256 {actual}, expected "
                        f"{content_hash}: the stored object is corrupted; refusing to use it"
                    )
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return target

    def verify(self, content_hash: str) -> str | None:
        if not self.exists(content_hash):
            return "missing"
        body = self.client.get_object(Bucket=self.bucket, Key=self.key(content_hash))["Body"]
        digest = hashlib.sha256()
        for chunk in iter(lambda: body.read(_CHUNK), b""):
            digest.update(chunk)
        actual = digest.hexdigest()
        return None if actual == content_hash else f"hash mismatch: stored bytes hash to {actual}"
