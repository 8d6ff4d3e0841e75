"""The ksyms device without FUSE: per-process opens, fresh snapshots, address policy, ioctls.

FreeBSD semantics: every open takes its own snapshot; one snapshot per process (thread
group) at a time; ENXIO when no consistent snapshot can be taken; ENOMEM on resource
shortage (more than ``max_open`` snapshots, or ``max_memory`` bytes of them). A second open
by a process that holds one gets that same snapshot (``reopen="share"``, the default: gdb
and nm open their file more than once) or EBUSY as on FreeBSD (``reopen="busy"``).

Size: every stat, fstat, KIOCGSIZE and read agree on one *served size*: the largest
snapshot open (or the latest built), rounded up to SIZE_BUCKET, which never shrinks while
any open (or a mapping, which holds its open) lasts. Each open's data is its own snapshot
followed by zeros up to that size, so nobody's mapping ever loses its last pages.

Page cache: the inode has one, shared by every open. An open is served through it (no
direct I/O) only while every open handle holds the same immutable image object (one
snapshot, one address policy); it keeps the cached pages (FOPEN_KEEP_CACHE) only once a
read on a handle of that *cache epoch* proves the epoch's first, invalidating open has
finished in the kernel. An open whose image differs from one still held is direct I/O:
its reads never touch the page cache. After an idle spell the device drops its images,
not the kernel its pages: an open whose new image has the dropped one's digest (and no
epoch began since) keeps them. (An ``mmap`` always goes through the page cache:
a direct-I/O open that maps a different snapshot while another is held shares pages with
it, as before; policies never mix, since opens of another policy are refused.)
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import KIOCGADDR, KIOCGSIZE
from .digest import image_digest
from .errors import ConfigError, KsymsError
from .freshness import KernelFirstJoin, ReadProgress
from .options import REOPEN_MODES
from .policy import (
    ProcessCreds,
    kallsyms_show_value,
    process_creds,
    read_sysctls,
    user_namespace,
)
from .readfile import ReadBuffer, ValueFiles
from .snapshot import snapshot_image
from .sources import Snapshot, Sources, take_snapshot

log = logging.getLogger(__name__)
SIZE_BUCKET = 64 << 10   # served size granularity: module churn rarely changes it
OPEN_WAIT = 1.0          # s an open may wait for a RELEASE (own slot, or other policy)
PARALLEL_READS = min(2, os.cpu_count() or 1)  # kallsyms reads at once (CPU-bound in the kernel)
GATHER = 0.01            # s without a new opener before a second read starts (a crowd shares it)
HOLD = 0.05              # s at most a paused reading waits for a crowd (Coalescer._hold)
_HEX_RUN = re.compile(r"(?i)(0x)?[0-9a-f]{8,}")


def redact(text: str) -> str:
    """``text`` without anything that looks like an address (8+ hex digits)."""
    return _HEX_RUN.sub("<hex>", text)


def served_round(n: int) -> int:
    return -(-n // SIZE_BUCKET) * SIZE_BUCKET


def _stored(image: object) -> int:
    """Memory an image holds: a VirtualImage's stored runs (its zeros cost nothing)."""
    return getattr(image, "real_size", None) or len(image)


class DeviceError(KsymsError):
    """An open/read/ioctl refused with a specific errno."""

    def __init__(self, err: int, why: str = ""):
        self.errno = err
        super().__init__(why or os.strerror(err))


@dataclass
class Handle:
    """One open(): its owner process and its own snapshot bytes."""

    tgid: int
    image: bytes
    show_addresses: bool
    flushed: bool = False   # its owner closed a descriptor of it: the slot frees at RELEASE
    direct_io: bool = True  # reads bypass the page cache (FOPEN_DIRECT_IO)
    keep_cache: bool = False  # the open keeps the inode's cached pages (FOPEN_KEEP_CACHE)
    epoch: int = 0          # the cache epoch it reads through (when not direct)
    backing: object = None  # passthrough: the image whose backing file the kernel reads


class Coalescer:
    """Share source reads among concurrent openers, never one older than they are.

    A caller waits for a read that *starts* after it arrived; a read already in flight
    when it arrives is not good enough (it may predate a module load the caller made),
    unless ``join`` proves it is as fresh (freshness.KernelFirstJoin: it had not yet
    read past the kernel's own symbols, which never change). Up to ``parallel`` reads
    run at once: a caller who finds only older reads in flight (none that may serve it)
    starts another once no new caller came for ``gather`` s (so a crowd shares it) or a
    slot frees, instead of waiting for the older read to end and only then starting.
    ``read`` is called with no argument, or with the read's progress given a ``join``;
    that progress's ``hold`` lets a reading paused near the end of the kernel's own
    symbols wait there while a crowd keeps coming (``_hold``).
    """

    def __init__(self, read: Callable[..., Snapshot], parallel: int = 1,
                 gather: float = 0.0, join: KernelFirstJoin | None = None):
        self._read, self._join = read, join
        self._parallel, self._gather = max(1, parallel), gather
        self._cond = threading.Condition()
        self._started = 0      # generation of the newest read begun
        self._done = 0         # generation of the newest read finished
        self._last_arrival = 0.0
        self._result: object = None
        self._flight: dict[int, ReadProgress | None] = {}  # reads in flight: their progress
        self._marked: dict[int, int] = {}  # generation -> callers who may join it
        self._ended: dict[int, tuple] = {}  # (result, progress) of marked ones that ended

    def _may_start(self, now: float) -> float:
        """0 if a caller may begin a read now, else the seconds to wait (inf: for a slot)."""
        if not self._flight:
            return 0.0
        if len(self._flight) >= self._parallel:
            return float("inf")
        return max(0.0, self._last_arrival + self._gather - now)

    def get(self) -> Snapshot:
        with self._cond:
            need = self._started + 1
            self._last_arrival = time.monotonic()
            marks = {}
            if self._join is not None:  # where each read in flight is at our arrival
                marks = {g: self._join.mark(p) for g, p in self._flight.items()}
                for g in marks:
                    self._marked[g] = self._marked.get(g, 0) + 1
            try:
                res, gen = self._wait(need, marks)
            finally:
                self._unmark(list(marks))
        if res is None:
            res = self._run(gen)
        kind, val = res
        if kind == "err":
            raise val
        return val

    def _wait(self, need: int, marks: dict) -> tuple[tuple | None, int]:
        """Under the lock: (a result, 0), or (None, generation) for a read to run."""
        while True:
            if self._done >= need and self._result is not None:
                return self._result, 0
            res = self._joined(marks) if marks else None
            if res is not None:
                return res, 0
            if self._started < need:  # no read began since we came
                if any(self._join.may_serve(m) for m in marks.values()):
                    self._cond.wait()  # one in flight may serve us: woken when it ends
                    continue
                wait = self._may_start(time.monotonic())
                if wait <= 0:
                    self._started += 1
                    p = self._join.progress() if self._join else None
                    if p is not None:  # a paused reading waits there while a crowd comes
                        p.hold = functools.partial(self._hold, time.monotonic())
                    self._flight[self._started] = p
                    return None, self._started
                self._cond.wait(None if wait == float("inf") else wait)
            else:
                self._cond.wait()

    def _joined(self, marks: dict) -> tuple | None:
        """The result of a read in flight at our arrival that ended and serves us."""
        for g in [g for g in marks if g not in self._flight]:
            mark = marks.pop(g)
            (kind, val), progress = self._ended[g]
            self._unmark([g])
            if kind == "ok" and self._join.serves(mark, progress, val):
                return kind, val
        return None

    def _unmark(self, gens: list[int]) -> None:
        for g in gens:
            self._marked[g] -= 1
            if not self._marked[g]:
                del self._marked[g]
                self._ended.pop(g, None)

    def _run(self, gen: int) -> tuple:
        progress = self._flight[gen]
        try:
            res = ("ok", self._read() if progress is None else self._read(progress))
            if self._join is not None:
                self._join.learn(res[1])
        except BaseException as e:  # handed to every waiter of this generation
            res = ("err", e)
        with self._cond:
            del self._flight[gen]
            if gen in self._marked:
                self._ended[gen] = (res, progress)
            if gen > self._done:
                self._done, self._result = gen, res
            self._cond.notify_all()
        return res

    def _hold(self, since: float) -> None:
        """A reading begun at ``since`` that may still serve newcomers (paused near the
        end of the kernel's own symbols, freshness.ReadProgress.paused) waits while
        callers keep coming after it began: until ``gather`` s pass without one, at most
        HOLD s. A crowd of processes starting over tens of ms then shares one reading
        (measured: 32 dd, 2 readings a wave without it); a lone caller never waits here."""
        with self._cond:
            while True:
                now = time.monotonic()
                quiet = now - self._last_arrival
                if (self._last_arrival <= since or quiet >= self._gather
                        or now - since >= HOLD):
                    return
                self._cond.wait(min(self._gather - quiet, since + HOLD - now))

    def forget(self) -> None:
        """Drop the last result (idle memory); a caller then always starts a new read."""
        with self._cond:
            if not self._flight:
                self._result = None


class Device:
    """What /dev/ksyms does, as plain methods the FUSE adapter delegates to."""

    def __init__(self, sources: Sources, *, arch: str | None = None,
                 elfclass: int | None = None, endian: str | None = None,
                 procfs: str = "/proc", sysctl_dir: str | None = None,
                 max_open: int = 64, max_memory: int = 1 << 30, max_pending: int = 32,
                 open_wait: float = OPEN_WAIT, reopen: str = "share"):
        if reopen not in REOPEN_MODES:
            raise ConfigError(f"--reopen must be one of {', '.join(REOPEN_MODES)}")
        self.reopen = reopen
        for name, val in (("max-open", max_open), ("max-memory", max_memory),
                          ("max-pending", max_pending), ("max-read", sources.max_read)):
            if val <= 0:
                raise ConfigError(f"--{name} must be positive")
        self.sources = sources
        self.target_overrides = {"arch": arch, "elfclass": elfclass, "endian": endian}
        self.procfs = procfs
        self.sysctl_dir = sysctl_dir or os.path.join(procfs, "sys", "kernel")
        self.max_open, self.max_memory, self.max_pending = max_open, max_memory, max_pending
        self.open_wait = open_wait
        self.init_userns = user_namespace("self", procfs)  # ours: the kernel's initial one
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # signalled at every RELEASE
        self._build_lock = threading.Lock()  # one build per (snapshot, policy), not one per opener
        self._handles: dict[int, Handle] = {}
        self._by_tgid: dict[int, list[int]] = {}  # a process's handles (shared opens)
        self._next_fh = 1
        self._pending = 0          # opens in progress (FUSE worker threads busy in open)
        self._priv_waiting = 0     # privileged opens waiting for unprivileged ones to go
        self._served = 0           # the size every stat/read/ioctl agrees on
        self._snap: Snapshot | None = None      # the newest kernel state read
        self._images: dict[bool, bytes] = {}     # its images, by "shows addresses"
        self._section_cache: dict = {}
        self._cache_image: object = None  # the image the page cache holds pages of
        self._epoch = 0                   # bumped when _cache_image changes
        self._confirmed = False           # an open of this epoch has read (so it invalidated)
        self._forgotten: tuple[int, bytes] | None = None  # (epoch, digest) of the image the
        # page cache held when an idle spell dropped it: the same bytes may resume it
        self._coalescer = Coalescer(self._read_sources, PARALLEL_READS, GATHER,
                                    KernelFirstJoin() if sources.kernel_first else None)
        self._values = ValueFiles()  # sysctls and the uevent seqnum, kept open on procfs/sysfs
        self._readbufs = [ReadBuffer()]  # free ones: kallsyms is read into one at every open
        self._busy_bufs: list[ReadBuffer] = []  # those a read is using now
        self.latest_size = 0
        self._latest_stored = 0  # memory of the last image built (estimate for the budget)
        self.mtime = time.time()
        self.on_idle = None  # called when the last open snapshot is released
        self._idle_since: float | None = time.monotonic()  # nothing open since then
        self.on_served: Callable[[int], None] | None = None  # the served size grew
        self.passthrough = False  # the adapter sets it once the kernel agreed (see
        #                           _choose_cache): then no open uses the page cache
        # the adapter sets it when it asks the kernel for no FLUSH at close
        # (FOPEN_NOFLUSH): (tgid, tid) -> whether the process still has a descriptor of
        # the device (holders.holds_descriptor); only RELEASE then says a handle closed
        self.holds: Callable[[int, int], bool] | None = None

    # -- snapshots -------------------------------------------------------------------
    def _read_sources(self, progress: ReadProgress | None = None) -> Snapshot:
        # up to PARALLEL_READS run at once (the Coalescer): each in a buffer of its own;
        # self._snap is only replaced here, under the lock
        with self._lock:
            buf = self._readbufs.pop() if self._readbufs else ReadBuffer(
                max((b.size_hint for b in self._busy_bufs), default=0))
            self._busy_bufs.append(buf)
            prev = self._snap
        try:
            snap = take_snapshot(self.sources, section_cache=self._section_cache,
                                 previous=prev, keep_raw=True, buffer=buf,
                                 progress=progress, values=self._values)
        finally:
            with self._lock:
                self._busy_bufs.remove(buf)
                self._readbufs.append(buf)
        if snap is prev:
            return snap
        with self._lock:  # a new kernel state: forget the old images
            cur = self._snap
            if cur is not prev and cur is not None and cur.same_reading(snap.raw,
                                                                        snap.raw_modules):
                return cur  # a parallel read found the same new state first: share it
            # (an older reading finishing last may put an older state here: the next open
            # compares against it and rebuilds; every handle keeps the image it was given)
            self._snap, self._images = snap, {}
            self._trim_cache_image()
        self.mtime = time.time()
        return snap

    def _held_bytes(self) -> int:
        """Bytes of snapshot images held (handles and cache; a shared image counts once)."""
        sizes = {id(img): _stored(img) for img in self._images.values()}
        sizes.update((id(h.image), _stored(h.image)) for h in self._handles.values())
        return sum(sizes.values())

    def _check_budget(self, need: int) -> None:
        """ENOMEM unless ``need`` more bytes of images fit; with passthrough every image
        costs twice its stored bytes (its memory file holds them again)."""
        if (self._held_bytes() + need) * (2 if self.passthrough else 1) > self.max_memory:
            raise DeviceError(errno.ENOMEM, f"snapshot memory budget ({self.max_memory >> 20}"
                              " MiB, --max-memory) used up")

    def _image_for(self, snap: Snapshot, show: bool) -> bytes:
        with self._lock:
            img = self._images.get(show) if snap is self._snap else None
        if img is not None:
            return img
        with self._build_lock:  # openers that shared one read wait for one build
            with self._lock:
                img = self._images.get(show) if snap is self._snap else None
                if img is None:
                    self._check_budget(self._latest_stored)  # estimate: the last one built
            if img is None:
                img = snapshot_image(snap, not show, **self.target_overrides)  # VirtualImage
                with self._lock:
                    self._check_budget(_stored(img))
                    if snap is self._snap:  # immutable bytes: shared between opens
                        self._images[show] = img
                        self.latest_size = len(img)
                        self._latest_stored = _stored(img)
                        self._grow_served(len(img))
        return img

    def _grow_served(self, size: int) -> None:
        """Under the lock: the served size covers ``size`` bytes (it never shrinks while
        anything is open); ``on_served`` hears of every growth before any stat can."""
        served = max(self._served, served_round(size))
        if served != self._served:
            self._served = served
            if self.on_served is not None:
                self.on_served(served)

    def prime(self) -> Snapshot:
        """Build a first snapshot (mount time): fails early on bad sources, sizes stat."""
        snap = self._coalescer.get()
        self._image_for(snap, True)
        return snap

    def snapshot(self, show: bool) -> bytes:
        try:
            return self._image_for(self._coalescer.get(), show)
        except MemoryError:
            raise DeviceError(errno.ENOMEM, "out of memory building a snapshot") from None

    # -- who is asking ------------------------------------------------------------------
    def _creds(self, tid: int) -> ProcessCreds:
        creds = process_creds(tid, self.procfs, self.init_userns)
        if creds is None:
            raise DeviceError(errno.ENXIO, f"cannot identify process {tid}")
        return creds

    # -- file operations ---------------------------------------------------------------
    def open(self, tid: int, flags: int) -> int:
        """A fresh snapshot for the calling process; EBUSY if it already has one open.
        Every refusal is logged (pid, uid, errno, reason; never an address)."""
        creds = None
        try:
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                raise DeviceError(errno.EROFS, "read-only device")
            creds = self._creds(tid)
            return self._open(creds, tid)
        except (KsymsError, MemoryError) as e:
            err = getattr(e, "errno", errno.ENOMEM)
            log.info("open refused: pid %d uid %s: %s: %s", tid,
                     "?" if creds is None else creds.uid, errno.errorcode.get(err, err),
                     redact(str(e) or type(e).__name__))
            raise

    def _open(self, creds: ProcessCreds, tid: int) -> int:
        show = kallsyms_show_value(read_sysctls(self.sysctl_dir, self._values),
                                   creds.cap_syslog)
        # a quarter of the in-progress slots is kept for openers who may see addresses
        limit = self.max_pending if show else max(1, self.max_pending * 3 // 4)
        with self._lock:
            if self._pending >= limit:
                raise DeviceError(errno.EAGAIN, f"{self._pending} opens already in "
                                  "progress (--max-pending)")
            self._pending += 1
        try:
            fh, shared = self._admit(creds.tgid, show, tid)
            if shared:
                return fh
            try:
                image = self.snapshot(show)
                resume = self._resume_digest(image)
                with self._cond:
                    if self.passthrough:
                        self._await_backing(image)
                    self._handles[fh].image = image
                    self._grow_served(len(image))
                    self._choose_cache(fh, resume)
            except BaseException:
                self.release(fh)
                raise
            return fh
        finally:
            with self._lock:
                self._pending -= 1

    def _closed(self, tgid: int, tid: int) -> frozenset[int]:
        """Without FLUSH (``holds``): the process's handles not known closed, if it has no
        descriptor of the device left (it closed it: the RELEASE is on its way, or a
        mapping, a child or a passed descriptor holds the open). For this open they count
        as flushed; nothing is marked (a handle whose descriptor the kernel has yet to
        install in a racing thread's table is not flushed for good)."""
        if self.holds is None:
            return frozenset()
        with self._lock:
            fhs = frozenset(fh for fh in self._by_tgid.get(tgid, ())
                            if not self._handles[fh].flushed)
        if not fhs or self.holds(tgid, tid):
            return frozenset()
        return fhs

    def _held_by(self, tgid: int, show: bool, closed: frozenset[int]) -> Handle | None:
        """The process's open (not closed) handle whose snapshot a second open may share."""
        for fh in self._by_tgid.get(tgid, ()):
            h = self._handles[fh]
            if not h.flushed and fh not in closed and h.show_addresses == show and h.image:
                return h
        return None

    def _refusal(self, tgid: int, show: bool,
                 closed: frozenset[int]) -> tuple[int, str, bool] | None:
        """Why ``tgid`` may not open now: (errno, reason, worth waiting for a RELEASE)."""
        fhs = self._by_tgid.get(tgid)
        if fhs:
            if any(not self._handles[fh].flushed and fh not in closed for fh in fhs):
                return errno.EBUSY, f"process {tgid} already has it open", False
            return (errno.EBUSY, f"process {tgid} still holds its previous open "
                    "(a duplicated or passed descriptor, a child, or a mapping)", True)
        if any(h.show_addresses != show for h in self._handles.values()):
            # mmap goes through the file's one page cache, whoever filled it: never let an
            # opener who may not see addresses share it with one who may
            return (errno.EBUSY, "held by a process with other address rights (one page "
                    "cache)", True)
        if not show and self._priv_waiting:  # privileged openers go first
            return errno.EBUSY, "a process that may see addresses is waiting", False
        if len(self._handles) >= self.max_open:
            # some may be closed already, their RELEASE (asynchronous) not here yet: wait
            # (without FLUSH, any may be)
            closing = self.holds is not None or any(h.flushed
                                                    for h in self._handles.values())
            return (errno.ENOMEM, f"{self.max_open} snapshots already open (--max-open)",
                    closing)
        return None

    def _new_handle(self, tgid: int, image: bytes, show: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._by_tgid.setdefault(tgid, []).append(fh)  # a racing thread of ours: EBUSY
        self._idle_since = None
        self._handles[fh] = Handle(tgid, image, show)
        return fh

    def _admit(self, tgid: int, show: bool, tid: int) -> tuple[int, bool]:
        """Reserve the process's slot, waiting up to ``open_wait`` for RELEASEs; or, for a
        process that holds a snapshot (``reopen="share"``), a handle on that one:
        (fh, shared)."""
        deadline = time.monotonic() + self.open_wait
        closed = self._closed(tgid, tid)
        with self._cond:
            held = self._held_by(tgid, show, closed) if self.reopen == "share" else None
            if held is not None:  # same bytes, no new read, no new memory
                fh = self._new_handle(tgid, held.image, show)
                self._choose_cache(fh)
                return fh, True
            queued = False
            try:
                while (why := self._refusal(tgid, show, closed)) is not None:
                    err, reason, wait = why
                    left = deadline - time.monotonic()
                    if not wait or left <= 0:
                        raise DeviceError(err, reason)
                    if show and not queued:  # hold back new unprivileged opens meanwhile
                        self._priv_waiting, queued = self._priv_waiting + 1, True
                    self._cond.wait(left)
            finally:
                if queued:
                    self._priv_waiting -= 1
            return self._new_handle(tgid, b"", show), False

    def _choose_cache(self, fh: int, digest: bytes | None = None) -> None:
        """Under the lock, once the handle has its image: page cache or direct I/O.
        ``digest``: the image's, when an idle spell dropped the cache image (see
        ``_resume_digest``)."""
        h = self._handles[fh]
        if self.passthrough:
            self._choose_backing(h)
            return
        if any(o.image and o.image is not h.image for o in self._handles.values()):
            h.direct_io, h.keep_cache = True, False  # another snapshot is held
            return
        if self._cache_image is not h.image:
            if (self._cache_image is None and digest is not None
                    and self._forgotten == (self._epoch, digest)):
                # the kernel's cached pages are exactly these bytes (nothing else entered
                # since the idle drop: the epoch did not move): keep them
                self._cache_image, self._confirmed, self._forgotten = h.image, True, None
            else:  # a new epoch: this open drops old pages
                self._new_epoch(h.image)
        h.direct_io, h.keep_cache, h.epoch = False, self._confirmed, self._epoch

    def _await_backing(self, image: object) -> None:
        """Under the lock, passthrough: the kernel lets an inode read one backing file at
        a time, and every open while it does must name that same file (fs/fuse/iomode.c);
        a mapping always maps it, direct I/O or not. So an open whose snapshot differs
        from one still held waits up to ``open_wait`` for its holders to go, then EBUSY.
        (We hear of a RELEASE only after the kernel let its file go: when none of ours
        holds one, neither does the kernel.)"""
        deadline = time.monotonic() + self.open_wait
        while any(h.backing is not None and h.backing is not image
                  for h in self._handles.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceError(errno.EBUSY, "another snapshot is open (with passthrough "
                                  "one is served at a time)")
            self._cond.wait(left)

    def _choose_backing(self, h: Handle) -> None:
        """Under the lock, passthrough: the open names its own image's backing file (no
        other is held: _await_backing); reads never reach us, nor the page cache."""
        h.backing, h.direct_io, h.keep_cache = h.image, False, False

    def stop_passthrough(self, fh: int) -> None:
        """The kernel would not take a backing file: no open names one from now on, and
        ``fh`` (decided for passthrough, none named) is direct I/O, which is always exact."""
        with self._lock:
            self.passthrough = False
            h = self._handles.get(fh)
            if h is not None:
                h.backing, h.direct_io, h.keep_cache = None, True, False

    def backing_of(self, fh: int) -> object:
        """Passthrough: the image whose backing file this open names (None otherwise)."""
        h = self._handles.get(fh)
        if h is None:
            raise DeviceError(errno.EBADF)
        return h.backing

    def live_images(self) -> set[int]:
        """ids of the images an open may still be given or name as backing: the newest
        state's, and every handle's."""
        with self._lock:
            imgs = list(self._images.values())
            for h in self._handles.values():
                imgs += [h.image, h.backing]
        return {id(i) for i in imgs if i is not None}

    def _resume_digest(self, image: bytes) -> bytes | None:
        """The image's digest if its bytes might be what the page cache kept over an idle
        spell (the cache image was dropped idle, no epoch began since), else None."""
        if self._forgotten is None or self._cache_image is not None:
            return None
        return image_digest(image)

    def _new_epoch(self, image: bytes | None) -> None:
        """Under the lock: the page cache now belongs to ``image`` (None: to no image);
        no open keeps it until a read of the new epoch proves it was dropped."""
        self._cache_image, self._confirmed, self._forgotten = image, False, None
        self._epoch += 1

    def _trim_cache_image(self) -> None:
        """Under the lock: forget the cache image unless a handle or the cache holds it."""
        img = self._cache_image
        if img is None or any(img is i for i in self._images.values()):
            return
        if not any(h.image is img for h in self._handles.values()):
            self._new_epoch(None)

    def cache_mode(self, fh: int) -> tuple[bool, bool]:
        """(direct_io, keep_cache) for the open's reply."""
        h = self._handles.get(fh)
        if h is None:
            raise DeviceError(errno.EBADF)
        return h.direct_io, h.keep_cache

    def image_for_read(self, fh: int, fill: bool = False) -> tuple[bytes, bool]:
        """image_of for a READ request, and whether the inode's page cache must be dropped
        once it is answered. ``fill``: the kernel is filling the page cache (no lock owner:
        a fault of a mapping, or readahead). A fill through a direct-I/O open means its
        snapshot was mapped: if a page-cache open of another image is held, those pages
        must go. A read through the page cache proves that the open which began its cache
        epoch has finished (its invalidation is done)."""
        h = self._handles.get(fh)
        if h is None:
            raise DeviceError(errno.EBADF)
        if not h.direct_io:
            if not self._confirmed and h.epoch == self._epoch:
                with self._lock:
                    if h.epoch == self._epoch and h.image is self._cache_image:
                        self._confirmed = True
            return h.image, False
        if not fill:
            return h.image, False
        with self._lock:
            mixed = any(not o.direct_io and o.image is not h.image
                        for o in self._handles.values())
            if mixed:  # no new open keeps the cache until a new epoch begins
                self._new_epoch(None)
        return h.image, mixed

    def image_of(self, fh: int) -> bytes:
        """The open's snapshot itself (no copy), for the adapter's zero-copy read."""
        h = self._handles.get(fh)
        if h is None:
            raise DeviceError(errno.EBADF)
        return h.image

    @property
    def served_size(self) -> int:
        """What every stat, fstat, KIOCGSIZE and read agree on (see the module doc)."""
        return self._served

    def read(self, fh: int, size: int, offset: int) -> bytes:
        """The open's snapshot, then zeros up to the served size."""
        image = self.image_for_read(fh)[0]
        end = min(offset + size, self._served)
        if offset < 0 or offset >= end:
            return b""
        data = image[offset:end]
        return data + bytes(end - offset - len(data))

    def flush(self, fh: int, tid: int) -> None:
        """close() of a descriptor by the owner: its slot frees at RELEASE, which comes when
        the last descriptor and mapping are gone (the next open waits briefly for it).
        Only where the kernel sends FLUSH: not once the adapter asked for none (``holds``)
        on Linux 5.16+."""
        with self._lock:
            h = self._handles.get(fh)
            if not tid or h is None or h.flushed:
                return
            if tid == h.tgid:  # the owner's leader (a tid equal to a tgid is that group's
                h.flushed = True  # leader): the usual close, no /proc read needed
                return
        creds = process_creds(tid, self.procfs, self.init_userns)
        if creds is not None and creds.tgid == h.tgid:
            with self._lock:
                h.flushed = True

    def release(self, fh: int) -> None:
        with self._cond:
            h = self._handles.pop(fh, None)
            fhs = self._by_tgid.get(h.tgid, []) if h is not None else []
            if fh in fhs:
                fhs.remove(fh)
                if not fhs:
                    del self._by_tgid[h.tgid]
            idle = not self._handles
            if idle:  # nothing open or mapped: the served size may shrink
                self._served = served_round(self.latest_size)
                self._idle_since = time.monotonic()
            self._trim_cache_image()
            self._cond.notify_all()
        if idle and self.on_idle is not None:
            self.on_idle()

    def forget_idle(self, min_idle: float) -> float | None:
        """After ``min_idle`` s with nothing open, drop the kept kernel state and images
        (the next open reads and builds afresh): an idle daemon holds only its code.
        Returns the seconds still to wait, or None (dropped, or something is open)."""
        with self._lock:
            if self._handles or self._pending or self._idle_since is None:
                return None
            left = self._idle_since + min_idle - time.monotonic()
            if left > 0:
                return left
            cached = self._cache_image if self._confirmed else None
            self._snap, self._images = None, {}
            self._new_epoch(None)
            epoch = self._epoch
            for buf in self._readbufs:  # no read runs: every read is inside an open
                buf.release()
        self._coalescer.forget()
        if cached is not None:  # its pages stay in the kernel: the same bytes may reuse them
            digest = image_digest(cached)
            del cached
            with self._lock:
                if self._epoch == epoch:
                    self._forgotten = (epoch, digest)
        return None

    def size_for(self, tid: int = 0) -> int:
        """stat size: the served size, the same for every caller."""
        return self._served

    def ioctl(self, fh: int, cmd: int) -> bytes:
        """KIOCGSIZE -> the open's size (the served size) as a size_t; else ENOTTY."""
        cmd &= 0xFFFFFFFF
        self.image_of(fh)
        if cmd == KIOCGSIZE:
            return struct.pack("=Q", self._served)
        if cmd == KIOCGADDR:  # the snapshot lives in the daemon, not in the caller
            raise DeviceError(errno.ENOTTY, "KIOCGADDR is not supported over FUSE")
        raise DeviceError(errno.ENOTTY)

    def open_count(self) -> int:
        with self._lock:
            return len(self._handles)
