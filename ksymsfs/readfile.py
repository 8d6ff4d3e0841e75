"""Read a source file safely: never block on a FIFO or device, never read without bound."""

from __future__ import annotations

import errno
import logging
import os
import stat

from .errors import SourceError

log = logging.getLogger(__name__)

# A real /proc/kallsyms is <= ~25 MB; a generated 3M-symbol one ~140 MB.
DEFAULT_MAX_READ = 512 << 20
CHUNK = 1 << 20


def read_regular(path: str, max_bytes: int = DEFAULT_MAX_READ,
                 missing_ok: bool = False) -> bytes | None:
    """The whole of ``path`` if it is a regular file of at most ``max_bytes``.

    Opened with O_NONBLOCK|O_NOCTTY so a FIFO, tty or device can never block the open;
    anything but S_IFREG is refused (procfs files are S_IFREG with st_size 0, so the size
    is not trusted: the read itself stops at ``max_bytes``).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if missing_ok and e.errno == errno.ENOENT:
            return None
        raise SourceError(f"{path}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.warning("%s: refused: not a regular file (mode %o)", path,
                        stat.S_IFMT(st.st_mode))
            raise SourceError(f"{path}: not a regular file; refusing to read it")
        return _read_bounded(fd, path, max_bytes)
    finally:
        os.close(fd)


def open_regular(path: str) -> int:
    """An O_NONBLOCK descriptor of ``path`` if it is a regular file, else OSError (ENXIO for
    a FIFO, device or socket, which is never read): for small optional files (notes,
    counters) whose callers keep their own error rules."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        log.warning("%s: refused: not a regular file", path)
        raise OSError(errno.ENXIO, "not a regular file")
    except BaseException:
        os.close(fd)
        raise


def _read_bounded(fd: int, path: str, max_bytes: int) -> bytes:
    chunks, total = [], 0
    while True:
        try:
            c = os.read(fd, min(CHUNK, max_bytes + 1 - total))
        except OSError as e:
            raise SourceError(f"{path}: cannot read: {e.strerror}") from None
        if not c:
            return b"".join(chunks)
        chunks.append(c)
        total += len(c)
        if total > max_bytes:
            log.warning("%s: refused: larger than the %d byte read cap", path, max_bytes)
            raise SourceError(f"{path}: larger than {max_bytes} bytes (the read cap, "
                              "--max-read); refusing it")
