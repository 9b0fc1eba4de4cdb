"""Write a file so that it appears complete or not at all, even under SIGKILL.

The bytes go to a file *without a name* in the output's folder (Linux ``O_TMPFILE``), which
gets one only when it is complete: a kill at any moment, ``kill -9`` included, leaves neither
a partial output nor a temporary file behind. Where the system cannot name such a file (another
OS, a file system without ``O_TMPFILE``, no permission to ``linkat`` a descriptor) the bytes go
to a hidden ``.NAME.tmp-PID`` beside the output instead, removed on every error Python sees;
only a kill can leave that one behind.

Either way the file is flushed to disk and renamed over the output in one step, so a reader
never sees a half-written file and an existing output survives a failed write.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import BinaryIO

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_can_name: dict[int, bool] = {}  # st_dev of a folder -> a nameless file there can be named


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - not a POSIX C library
        return None


def _name_fd(fd: int, target: Path) -> bool:
    """Give the nameless file ``fd`` the name ``target`` (linkat with AT_EMPTY_PATH, else the
    /proc/self/fd link open(2) documents); False when neither works here."""
    libc = _libc()
    if libc is not None and hasattr(libc, "linkat"):
        if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(target), _AT_EMPTY_PATH) == 0:
            return True
    try:
        os.link(f"/proc/self/fd/{fd}", target)
        return True
    except OSError:
        return False


def _nameless_supported(folder: Path) -> bool:
    """Whether a nameless file in ``folder`` can later be named (probed once per file system)."""
    if not hasattr(os, "O_TMPFILE"):
        return False
    try:
        dev = folder.stat().st_dev
    except OSError:
        return False
    if dev not in _can_name:
        ok = False
        try:
            fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600)
        except OSError:
            fd = -1
        if fd >= 0:
            probe = folder / f".qconvert-probe-{os.getpid()}"
            try:
                ok = _name_fd(fd, probe)
            finally:
                os.close(fd)
                if ok:
                    probe.unlink(missing_ok=True)
        _can_name[dev] = ok
    return _can_name[dev]


class AtomicFile:
    """``f = AtomicFile(path)``; write (and seek) ``f.file``; then ``f.commit()`` or ``f.discard()``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._nameless = _nameless_supported(self.path.parent)
        if self._nameless:
            fd = os.open(self.path.parent, os.O_TMPFILE | os.O_WRONLY, 0o666)
            self.file: BinaryIO = os.fdopen(fd, "wb")
        else:
            self.file = open(self._tmp, "wb")

    def commit(self) -> Path:
        """Flush to disk and put the file at ``path`` (replacing what was there)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        try:
            if self._nameless:
                self._tmp.unlink(missing_ok=True)  # a stale one of a recycled pid
                if not _name_fd(self.file.fileno(), self._tmp):
                    raise OSError(f"cannot name the finished file {self._tmp}")
            os.replace(self._tmp, self.path)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        finally:
            self.file.close()
        return self.path

    def discard(self) -> None:
        """Drop what was written; ``path`` stays as it was."""
        try:
            self.file.close()
        finally:
            if not self._nameless:
                self._tmp.unlink(missing_ok=True)
