"""The ksyms device without FUSE: per-process opens, fresh snapshots, address policy, ioctls.

FreeBSD semantics: every open takes its own snapshot; one open per process (thread
group) at a time, else EBUSY; ENXIO when no consistent snapshot can be taken; ENOMEM
on resource shortage (here also: more than ``max_open`` snapshots open at once).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import KIOCGADDR, KIOCGSIZE
from .errors import KsymsError
from .policy import ProcessCreds, kallsyms_show_value, process_creds, read_sysctls
from .snapshot import snapshot_image
from .sources import Snapshot, Sources, take_snapshot

log = logging.getLogger(__name__)


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


class Coalescer:
    """Share one source read among concurrent openers, never one that began before them.

    A caller waits for a read that *starts* after it arrived; a read already in flight
    when it arrives is not good enough (it may predate a module load the caller made).
    """

    def __init__(self, read: Callable[[], Snapshot]):
        self._read = read
        self._cond = threading.Condition()
        self._started = 0      # generation of the newest read begun
        self._done = 0         # generation of the newest read finished
        self._building = False
        self._result: object = None

    def get(self) -> Snapshot:
        with self._cond:
            need = self._started + 1
            while True:
                if self._done >= need:
                    res = self._result
                    break
                if not self._building:
                    self._building = True
                    self._started += 1
                    gen = self._started
                    res = None
                    break
                self._cond.wait()
        if res is None:
            try:
                res = ("ok", self._read())
            except BaseException as e:  # handed to every waiter of this generation
                res = ("err", e)
            with self._cond:
                self._done, self._result, self._building = gen, res, False
                self._cond.notify_all()
        kind, val = res
        if kind == "err":
            raise val
        return val


class Device:
    """What /dev/ksyms does, as plain methods the FUSE adapter delegates to."""

    def __init__(self, sources: Sources, *, arch: str | None = None,
                 elfclass: int | None = None, endian: str | None = None,
                 procfs: str = "/proc", sysctl_dir: str | None = None,
                 max_open: int = 64):
        self.sources = sources
        self.target_overrides = {"arch": arch, "elfclass": elfclass, "endian": endian}
        self.procfs = procfs
        self.sysctl_dir = sysctl_dir or os.path.join(procfs, "sys", "kernel")
        self.max_open = max_open
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()  # one build per (snapshot, policy), not one per opener
        self._handles: dict[int, Handle] = {}
        self._by_tgid: dict[int, int] = {}
        self._next_fh = 1
        self._snap: Snapshot | None = None      # the newest kernel state read
        self._images: dict[bool, bytes] = {}     # its images, by "shows addresses"
        self._section_cache: dict = {}
        self._coalescer = Coalescer(self._read_sources)
        self.latest_size = 0
        self.mtime = time.time()
        self.on_idle = None  # called when the last open snapshot is released

    # -- snapshots -------------------------------------------------------------------
    def _read_sources(self) -> Snapshot:
        # reads are serialized by the Coalescer, so self._snap is only replaced here
        snap = take_snapshot(self.sources, section_cache=self._section_cache,
                             previous=self._snap)
        if snap is not self._snap:  # a new kernel state: forget the old images
            with self._lock:
                self._snap, self._images = snap, {}
            self.mtime = time.time()
        return snap

    def _image_for(self, snap: Snapshot, show: bool) -> bytes:
        with self._lock:
            img = self._images.get(show) if snap is self._snap else None
        if img is not None:
            return img
        with self._build_lock:  # openers that shared one read wait for one build
            with self._lock:
                img = self._images.get(show) if snap is self._snap else None
            if img is None:
                img = snapshot_image(snap, not show, **self.target_overrides)  # VirtualImage
                with self._lock:
                    if snap is self._snap:  # immutable bytes: shared between opens
                        self._images[show] = img
                        self.latest_size = len(img)
        return img

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
        creds = process_creds(tid, self.procfs)
        if creds is None:
            raise DeviceError(errno.ENXIO, f"cannot identify process {tid}")
        return creds

    # -- file operations ---------------------------------------------------------------
    def open(self, tid: int, flags: int) -> int:
        """A fresh snapshot for the calling process; EBUSY if it already has one open."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise DeviceError(errno.EROFS, "read-only device")
        creds = self._creds(tid)
        show = kallsyms_show_value(read_sysctls(self.sysctl_dir), creds.cap_syslog)
        with self._lock:
            if creds.tgid in self._by_tgid:
                raise DeviceError(errno.EBUSY, f"process {creds.tgid} already has it open")
            if any(h.show_addresses != show for h in self._handles.values()):
                # mmap goes through the file's one page cache, whoever filled it: never
                # let an opener who may not see addresses share it with one who may
                raise DeviceError(errno.EBUSY, "open by a process with other address rights")
            if len(self._handles) >= self.max_open:
                raise DeviceError(errno.ENOMEM, f"{self.max_open} snapshots already open")
            fh = self._next_fh
            self._next_fh += 1
            self._by_tgid[creds.tgid] = fh  # reserve: a racing thread of ours gets EBUSY
            self._handles[fh] = Handle(creds.tgid, b"", show)
        try:
            image = self.snapshot(show)
        except BaseException:
            self.release(fh)
            raise
        with self._lock:
            self._handles[fh] = Handle(creds.tgid, image, show)
        return fh

    def image_of(self, fh: int) -> bytes:
        """The open's snapshot itself (no copy), for the adapter's zero-copy read."""
        h = self._handles.get(fh)
        if h is None:
            raise DeviceError(errno.EBADF)
        return h.image

    def read(self, fh: int, size: int, offset: int) -> bytes:
        return self.image_of(fh)[offset:offset + size] if offset >= 0 else b""

    def flush(self, fh: int, tid: int) -> None:
        """close() by the owner: free its one-open slot now (FUSE sends RELEASE later,
        asynchronously, so open-close-open would otherwise race into EBUSY)."""
        with self._lock:
            h = self._handles.get(fh)
            if not tid or h is None or self._by_tgid.get(h.tgid) != fh:
                return  # nothing to free (slot already freed, e.g. by a dup'd fd's close)
        creds = process_creds(tid, self.procfs)
        with self._lock:
            if creds is not None and creds.tgid == h.tgid and self._by_tgid.get(h.tgid) == fh:
                del self._by_tgid[h.tgid]

    def release(self, fh: int) -> None:
        with self._lock:
            h = self._handles.pop(fh, None)
            if h is not None and self._by_tgid.get(h.tgid) == fh:
                del self._by_tgid[h.tgid]
            idle = not self._handles
        if idle and self.on_idle is not None:
            self.on_idle()

    def size_for(self, tid: int) -> int:
        """stat size: the caller's open snapshot, else the latest snapshot built."""
        creds = process_creds(tid, self.procfs) if tid else None
        if creds is not None:
            with self._lock:
                fh = self._by_tgid.get(creds.tgid)
                h = self._handles.get(fh) if fh else None
                if h is None:  # flushed but not yet released: still the caller's
                    h = next((x for x in self._handles.values() if x.tgid == creds.tgid),
                             None)
            if h is not None and h.image:
                return len(h.image)
        return self.latest_size

    def ioctl(self, fh: int, cmd: int) -> bytes:
        """KIOCGSIZE -> the snapshot's size as a size_t; anything else ENOTTY."""
        cmd &= 0xFFFFFFFF
        image = self.image_of(fh)
        if cmd == KIOCGSIZE:
            return struct.pack("=Q", len(image))
        if cmd == KIOCGADDR:  # the snapshot lives in the daemon, not in the caller
            raise DeviceError(errno.ENOTTY, "KIOCGADDR is not supported over FUSE")
        raise DeviceError(errno.ENOTTY)

    def open_count(self) -> int:
        with self._lock:
            return len(self._handles)
