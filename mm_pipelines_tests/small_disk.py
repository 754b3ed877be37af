"""A small disk for fault tests: a real 1 MB tmpfs where this machine lets us mount one
(root, as CI runs); without the right to mount, ENOSPC/EROFS are raised at the media
store's write boundary instead (its copy into the store), and a warning says so."""

from __future__ import annotations

import errno
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount_tmpfs(target: Path, size: str) -> bool:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    return done.returncode == 0


class SmallDisk:
    """`full()`, `grow()`, `read_only()`, `writable()` act on a real file system when one
    is mounted, else on the injected error."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.mounted = _mount_tmpfs(root, "1m")
        self.injected: int | None = None
        if not self.mounted:
            warnings.warn(
                "tmpfs cannot be mounted here: disk faults are injected as OSError at the "
                "media store's write boundary instead",
                stacklevel=2,
            )

    def _remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.root)], check=True)

    def grow(self) -> None:
        if self.mounted:
            self._remount("size=64m")
        self.injected = None

    def read_only(self) -> None:
        if self.mounted:
            self._remount("ro")
        else:
            self.injected = errno.EROFS

    def writable(self) -> None:
        if self.mounted:
            self._remount("rw")
        self.injected = None

    def full(self) -> None:
        if not self.mounted:
            self.injected = errno.ENOSPC

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=False)


def small_disk_at(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    """A full SmallDisk at `root` (1 MB; its first write past that fails)."""
    disk = SmallDisk(root)
    if not disk.mounted:
        import shutil as real_shutil

        from mm_pipelines.storage import media_store

        original = real_shutil.copyfile

        def copyfile(src, dst, *args, **kwargs):
            if disk.injected is not None and str(dst).startswith(str(disk.root)):
                raise OSError(disk.injected, os.strerror(disk.injected), str(dst))
            return original(src, dst, *args, **kwargs)

        monkeypatch.setattr(media_store.shutil, "copyfile", copyfile)
    disk.full()
    try:
        yield disk
    finally:
        disk.unmount()
