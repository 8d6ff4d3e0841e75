"""Read a source file safely: never block on a FIFO or device, never read without bound."""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import threading
import weakref

from .errors import SourceError
from .freshness import READ_BUFFER, SEQ_SLACK, STEP, ReadProgress

log = logging.getLogger(__name__)

# A real /proc/kallsyms is <= ~25 MB; a generated 3M-symbol one ~140 MB.
DEFAULT_MAX_READ = 512 << 20
CHUNK = 1 << 20
# a tracked reading pauses this far before an unchecked span's end (ReadBuffer._compare):
# there the kernel has made at most SEQ_SLACK more (ReadProgress.paused), so the openers
# who arrive while it waits for a crowd (its ``hold``) still find it inside the span
PAUSE_BEFORE = SEQ_SLACK + 4096


def read_regular(path: str, max_bytes: int = DEFAULT_MAX_READ,
                 missing_ok: bool = False, into: ReadBuffer | None = None,
                 progress: ReadProgress | None = None, expect: bytes | None = None,
                 unchecked: tuple[int, int] = (0, 0)) -> bytes | memoryview | None:
    """The whole of ``path`` if it is a regular file of at most ``max_bytes``.

    Opened with O_NONBLOCK|O_NOCTTY so a FIFO, tty or device can never block the open;
    anything but S_IFREG is refused (procfs files are S_IFREG with st_size 0, so the size
    is not trusted: the read itself stops at ``max_bytes``). With ``into``, the bytes are
    read into that buffer and a view of them is returned (valid until its next read),
    or ``expect`` itself if the file held exactly its bytes (ReadBuffer.read_fd; bytes
    in the span ``unchecked`` are taken as equal, see there).
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
            return into.read_fd(fd, path, max_bytes, progress, expect, unchecked)
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


class ValueFiles:
    """Small procfs and sysfs value files (sysctls, counters) read at every open.

    On those file systems a file stays open and each read is a ``pread`` at offset 0,
    which the kernel answers afresh from the live value (a sysctl's handler, a sysfs
    attribute's ``show``): no path walk, open and close, 0.13-0.18 ms → 0.03 ms once the
    caches are cold, as they are after every kallsyms read. Any other file (a test's, a
    ``--sysctl-dir``) is opened anew at every read, since it may be replaced. Never
    blocks on a FIFO planted at a path (open_regular).
    """

    def __init__(self, live_roots: tuple[str, ...] = ("/proc", "/sys")):
        self._roots = live_roots
        self._live_devs: set[int] | None = None
        self._kept: dict[str, int] = {}
        self._lock = threading.Lock()
        weakref.finalize(self, _close_all, self._kept)

    def read(self, path: str, limit: int = 64) -> bytes | None:
        """The file's first ``limit`` bytes now, or None if it cannot be read."""
        fd = self._kept.get(path, -1)
        if fd >= 0:
            try:
                return os.pread(fd, limit, 0)
            except OSError:
                return None
        data, fd = _read_value(path, limit)
        if fd >= 0 and not self._keep(path, fd):
            os.close(fd)
        return data

    def _keep(self, path: str, fd: int) -> bool:
        try:
            dev = os.fstat(fd).st_dev
        except OSError:
            return False
        with self._lock:
            if self._live_devs is None:
                self._live_devs = set()
                for root in self._roots:
                    try:
                        self._live_devs.add(os.stat(root).st_dev)
                    except OSError:
                        pass
            if dev not in self._live_devs or path in self._kept:
                return False
            self._kept[path] = fd
            return True

    def close(self) -> None:
        with self._lock:
            _close_all(self._kept)


def read_value(path: str, limit: int = 64) -> bytes | None:
    """A small value file's first ``limit`` bytes, opened anew (None if unreadable)."""
    data, fd = _read_value(path, limit)
    if fd >= 0:
        os.close(fd)
    return data


def _read_value(path: str, limit: int) -> tuple[bytes | None, int]:
    """(its bytes, the open descriptor) or (None, -1); never blocks on a FIFO."""
    try:
        fd = open_regular(path)
    except OSError:
        return None, -1
    try:
        return os.pread(fd, limit, 0), fd
    except OSError:
        os.close(fd)
        return None, -1


def _close_all(kept: dict[str, int]) -> None:
    fds = list(kept.values())
    kept.clear()
    for fd in fds:
        os.close(fd)


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
        self._scratch = bytearray()  # where a reading is compared with the previous one
        self._hint = hint  # the size it had: after a release, allocated at once

    @property
    def size_hint(self) -> int:
        return max(self._hint, len(self._buf))

    def release(self) -> None:
        self._hint = self.size_hint
        self._buf, self._scratch = bytearray(), bytearray()

    def read_fd(self, fd: int, path: str, max_bytes: int,
                progress: ReadProgress | None = None,
                expect: bytes | None = None,
                unchecked: tuple[int, int] = (0, 0)) -> bytes | memoryview:
        """All of ``fd``: ``expect`` itself if the bytes are exactly its, else a view of
        this buffer holding them. ``expect`` (the previous reading) is compared a read
        at a time as the bytes arrive, in a small buffer still in the CPU's cache: an
        unchanged kallsyms is never written out and compared again (1 ms of a 27 ms
        open); the first difference falls back to reading into this buffer.

        ``unchecked`` = (a, b): the caller knows that a reading equal to ``expect`` in its
        first ``a`` bytes is equal in ``[a, b)`` too (freshness.unchanging_span: the
        kernel's own symbols), so those bytes are read but not compared (the memcmp
        against the cold previous reading was 0.6-0.8 ms of an open). They are read page
        by page, never sought past: seq_file's ``lseek`` makes them in one stretch of
        kernel code with no preemption point (~23-38 ms here), which held up every task
        that woke on that CPU meanwhile (a sleeper's wakeups 48-60 ms late, against 4 ms
        while kallsyms is read; README "Performance")."""
        if expect is not None:
            pos, differs = self._compare(fd, path, expect, progress, unchecked)
            a, b = unchecked
            if differs is None and a < pos < b:
                # it ended inside the span that cannot change: not the file the caller
                # said, so its uncompared bytes may not be expect's; read it again, all
                # of it compared (ending at ``b``, where modules would begin, is normal)
                _rewind(fd, path)
                return self.read_fd(fd, path, max_bytes, progress, expect)
            if differs is None and pos == len(expect):
                if pos > max_bytes:
                    _too_big(path, max_bytes)
                return expect
            differs = differs or memoryview(b"")  # None: ended early, equal so far
            self._ensure(pos + len(differs), keep=0)  # the equal part comes from expect
            self._buf[:pos] = memoryview(expect)[:pos]
            self._buf[pos:pos + len(differs)] = differs
            pos += len(differs)
            if progress is not None:
                progress.advance(pos)
        else:
            pos = 0
        # BufferedReader.readinto loops over read() in C until the view is full or EOF;
        # tracked, STEP bytes per call and a small buffer, so the kernel is never far
        # ahead of what ``progress`` says (freshness.AHEAD)
        f = io.BufferedReader(io.FileIO(fd, "rb", closefd=False),
                              CHUNK if progress is None else READ_BUFFER)
        return self._read_on(f, path, pos, max_bytes, progress)

    def _compare(self, fd: int, path: str, expect: bytes, progress: ReadProgress | None,
                 unchecked: tuple[int, int]) -> tuple[int, memoryview | None]:
        """Read and compare with ``expect`` while equal (but for ``unchecked``): (bytes
        read, None) at the end of the file if all were equal, else (bytes equal before
        the differing read, that read's bytes). One read() per loop (procfs gives a page
        per read): 0.3 ms less per kallsyms than BufferedReader's loop, whose reads into
        its own buffer and copies cost more than this loop's Python steps. Tracked, it
        pauses PAUSE_BEFORE the span's end (``_pause``)."""
        if len(self._scratch) < READ_BUFFER:
            self._scratch = bytearray(READ_BUFFER)
        mv, read = memoryview(self._scratch), io.FileIO(fd, "rb", closefd=False).readinto
        a, b = unchecked
        pause = b - PAUSE_BEFORE if progress is not None and a < b - PAUSE_BEFORE else -1
        pos, told = 0, 0
        while True:
            try:  # _readinto's wrapping, inline: one call less in a loop of ~1,300
                # (a read that would pass the pause ends there)
                n = read(mv if not pos < pause < pos + len(mv) else mv[:pause - pos])
            except OSError as e:
                raise SourceError(f"{path}: cannot read: {e.strerror}") from None
            end = pos + n
            # told at once when one more read could leave it a STEP behind (AHEAD)
            if progress is not None and (end - told > STEP - READ_BUFFER or not n):
                progress.advance(end)
                told = end
            if not n:
                return pos, None
            if end > b or pos < a:  # not all inside the unchecked span: compare the rest
                lo, hi = (max(a, pos), min(b, end)) if a < end and pos < b else (end, end)
                # a memcmp at pos (False past the end), then one after the span
                if not (expect.startswith(mv[:lo - pos], pos)
                        and expect.startswith(mv[hi - pos:n], hi)):
                    return pos, mv[:n]
            pos = end
            if pos == pause:
                _pause(progress, pos)
                told = pos

    def _ensure(self, need: int, keep: int | None = None) -> None:
        """Room for ``need`` bytes plus a CHUNK, keeping the first ``keep`` (default
        ``need``) bytes read so far (a view of the old buffer may live)."""
        if len(self._buf) - need < CHUNK:
            bigger = bytearray(max(2 * len(self._buf), need + CHUNK, self._hint))
            keep = min(need if keep is None else keep, len(self._buf))
            bigger[:keep] = memoryview(self._buf)[:keep]
            self._buf = bigger

    def _read_on(self, f: io.BufferedReader, path: str, pos: int, max_bytes: int,
                 progress: ReadProgress | None) -> memoryview:
        while True:
            self._ensure(pos)
            want = min(len(self._buf) - pos, max_bytes + 1 - pos)
            if progress is not None:
                want = min(want, STEP)
            with memoryview(self._buf) as mv:
                n = _readinto(f, path, mv[pos:pos + want])
            pos += n
            if n < want:
                return self._ended(path, pos, max_bytes, progress)
            if progress is not None:
                progress.advance(pos)
            if pos > max_bytes:
                _too_big(path, max_bytes)

    def _ended(self, path: str, pos: int, max_bytes: int,
               progress: ReadProgress | None) -> memoryview:
        if progress is not None:
            progress.advance(pos)
        if pos > max_bytes:
            _too_big(path, max_bytes)
        return memoryview(self._buf)[:pos]


def _pause(progress: ReadProgress, pos: int) -> None:
    """A reading stopped at ``pos`` inside the span that cannot change: the kernel has
    made nothing past it but the page seq_file keeps, so openers may still join the
    reading (``progress.paused``), and while they keep coming (a crowd) the reader waits
    for them here (``progress.hold``) before it reads on."""
    progress.advance(pos)
    progress.paused(pos)
    if progress.hold is not None:
        progress.hold()
    progress.advance(pos)


def _rewind(fd: int, path: str) -> None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror}") from None


def _readinto(f: io.BufferedReader, path: str, view: memoryview) -> int:
    try:
        return f.readinto(view)
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror}") from None


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
