"""Read a source file safely: never block on a FIFO or device, never read without bound."""

from __future__ import annotations

import errno
import io
import logging
import os
import stat

from .errors import SourceError
from .freshness import READ_BUFFER, STEP, ReadProgress

log = logging.getLogger(__name__)

# A real /proc/kallsyms is <= ~25 MB; a generated 3M-symbol one ~140 MB.
DEFAULT_MAX_READ = 512 << 20
CHUNK = 1 << 20


def read_regular(path: str, max_bytes: int = DEFAULT_MAX_READ,
                 missing_ok: bool = False, into: ReadBuffer | None = None,
                 progress: ReadProgress | None = None) -> bytes | memoryview | None:
    """The whole of ``path`` if it is a regular file of at most ``max_bytes``.

    Opened with O_NONBLOCK|O_NOCTTY so a FIFO, tty or device can never block the open;
    anything but S_IFREG is refused (procfs files are S_IFREG with st_size 0, so the size
    is not trusted: the read itself stops at ``max_bytes``). With ``into``, the bytes are
    read into that buffer and a view of them is returned (valid until its next read).
    ``progress`` learns the bytes received, at least every STEP bytes.
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
        if into is not None:
            return into.read_fd(fd, path, max_bytes, progress)
        return _read_bounded(fd, path, max_bytes, progress, st.st_size)
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


class ReadBuffer:
    """One buffer reused for every read of a big file (the device's kallsyms at each open).

    procfs answers one page per read(): 1,300 reads per kallsyms, each into a fresh 1 MiB
    bytes object, then a join (allocations, 5 MB of new pages faulted in, one more copy).
    Here the pages stay mapped between reads and the read loop runs in C; the caller
    copies out only what it keeps (a changed text).
    One reader at a time per buffer (the device keeps one per read in flight);
    ``release`` frees it. ``hint``: the size to allocate at once (another buffer's
    ``size_hint``): no doublings, whose small steps would stay in the heap.
    """

    def __init__(self, hint: int = 0) -> None:
        self._buf = bytearray()
        self._hint = hint  # the size it had: after a release, allocated at once

    @property
    def size_hint(self) -> int:
        return max(self._hint, len(self._buf))

    def release(self) -> None:
        self._hint = self.size_hint
        self._buf = bytearray()

    def read_fd(self, fd: int, path: str, max_bytes: int,
                progress: ReadProgress | None = None) -> memoryview:
        # BufferedReader.readinto loops over read() in C until the view is full or EOF
        # (a Python loop over 1,300 page-sized reads cost ~3 ms more per open); tracked,
        # STEP bytes per call and a small buffer, so the kernel is never far ahead of
        # what ``progress`` says (freshness.AHEAD)
        f = io.BufferedReader(io.FileIO(fd, "rb", closefd=False),
                              CHUNK if progress is None else READ_BUFFER)
        buf, pos = self._buf, 0
        while True:
            if len(buf) - pos < CHUNK:  # a new, bigger buffer (a view of the old may live)
                bigger = bytearray(max(2 * len(buf), pos + CHUNK, self._hint))
                bigger[:pos] = memoryview(buf)[:pos]
                buf = self._buf = bigger
            want = min(len(buf) - pos, max_bytes + 1 - pos)
            if progress is not None:
                want = min(want, STEP)
            with memoryview(buf) as mv:
                try:
                    n = f.readinto(mv[pos:pos + want])
                except OSError as e:
                    raise SourceError(f"{path}: cannot read: {e.strerror}") from None
            pos += n
            if progress is not None:
                progress.advance(pos)
            if pos > max_bytes:
                _too_big(path, max_bytes)
            if n < want:
                return memoryview(buf)[:pos]


def _too_big(path: str, max_bytes: int) -> None:
    log.warning("%s: refused: larger than the %d byte read cap", path, max_bytes)
    raise SourceError(f"{path}: larger than {max_bytes} bytes (the read cap, "
                      "--max-read); refusing it")


def _read_bounded(fd: int, path: str, max_bytes: int,
                  progress: ReadProgress | None = None, size: int = 0) -> bytes:
    """To EOF in chunks; untracked, a file whose ``size`` is known (not procfs) first in one
    read of all of it: a 138 MB file in 1 MiB chunks outgrew the heap's trim threshold,
    so every read faulted the chunks' pages in again, then the join's (twice the page
    faults of one buffer, and a copy)."""
    chunks, total = [], 0
    chunk = CHUNK if progress is None else STEP
    # the first read takes all of a sized file (+ 1: one grown since the fstat reads on);
    # then on to EOF, since a short read is not one (kernfs gives a page per read)
    want = size + 1 if progress is None and 0 < size <= max_bytes else chunk
    while True:
        try:
            c = os.read(fd, min(want, max_bytes + 1 - total))
        except OSError as e:
            raise SourceError(f"{path}: cannot read: {e.strerror}") from None
        want = chunk
        if not c:
            return b"".join(chunks)
        chunks.append(c)
        total += len(c)
        if progress is not None:
            progress.advance(total)
        if total > max_bytes:
            _too_big(path, max_bytes)
