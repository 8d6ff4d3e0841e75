"""The FUSE adapter (the only module importing fusepy): delegate to Device, map errors to errno."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable

import fuse as fuse_module
from fuse import FUSE, FuseOSError, Operations, fuse_file_info, fuse_get_context

from .backing import BackingFile
from .device import Device, redact
from .errors import KsymsError
from .holders import holds_descriptor
from .malloc import tune_malloc
from .mountpoint import mounted_dev

log = logging.getLogger(__name__)


def _errno_of(e: BaseException) -> int:
    if isinstance(e, KsymsError):
        return e.errno
    if isinstance(e, MemoryError):
        return errno.ENOMEM
    if isinstance(e, OSError) and e.errno:
        return e.errno
    return errno.EIO


class KsymsOperations(Operations):
    """A single read-only regular file: the mount point itself is the device node."""

    use_ns = True

    def __init__(self, device: Device, uid: int, gid: int, notifier: Notifier | None = None,
                 passthrough: Passthrough | None = None):
        self.device = device
        self.uid, self.gid = uid, gid
        self.notifier = notifier or Notifier()
        self.passthrough = passthrough or Passthrough(device, False)

    def __call__(self, op: str, *args: object) -> object:
        try:
            return super().__call__(op, *args)
        except FuseOSError:
            raise
        except Exception as e:  # noqa: BLE001  every failure becomes an errno, logged
            err = _errno_of(e)
            (log.debug if isinstance(e, KsymsError) else log.exception)(
                "%s failed: %s (errno %s)", op, redact(str(e)), errno.errorcode.get(err, err))
            raise FuseOSError(err) from None

    def getattr(self, path: str, fh: object = None) -> dict:
        if path != "/":
            raise FuseOSError(errno.ENOENT)
        t = int(self.device.mtime * 1e9)
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_uid": self.uid,
                "st_gid": self.gid, "st_size": self.device.served_size,
                "st_atime": t, "st_mtime": t, "st_ctime": t, "st_blksize": 4096}

    def open(self, path: str, fi: fuse_file_info) -> int:
        _uid, _gid, pid = fuse_get_context()
        fi.fh = self.device.open(pid, fi.flags)
        try:  # passthrough: the reply names the backing file (Passthrough._send)
            self.passthrough.prepare(fi.fh)
        except BaseException:
            self.device.release(fi.fh)
            raise
        # direct I/O (every read reaches us with this open's handle) unless every open
        # holds this same image: then the page cache (see device's module doc)
        fi.direct_io, fi.keep_cache = self.device.cache_mode(fi.fh)
        # the kernel trusts attributes for the rest of the jiffy they came in (even with
        # attr_timeout=0): an fstat right after this open could get a size answered before
        # it (a stat by someone else, before an idle shrink), map more than we serve, and
        # die of SIGBUS once a short read shrinks i_size. Drop them: its fstat asks us.
        err = self.notifier.inval(-1)
        if err:
            log.debug("attribute invalidation at open failed: errno %d", -err)
        return 0

    def read(self, path: str, size: int, offset: int, fi: fuse_file_info) -> bytes:
        # fusepy registers the READ callback only if this exists; _ZeroCopyFUSE.read
        # serves it without coming here
        return self.device.read(fi.fh, size, offset)

    def flush(self, path: str, fi: fuse_file_info) -> int:
        _uid, _gid, pid = fuse_get_context()
        self.device.flush(fi.fh, pid)
        return 0

    def release(self, path: str, fi: fuse_file_info) -> int:
        self.passthrough.forget(fi.fh)
        self.device.release(fi.fh)
        self.passthrough.prune()
        return 0

    def ioctl(self, path: str, cmd: int, arg: object, fi: fuse_file_info, flags: int,
              data: int) -> int:
        out = self.device.ioctl(fi.fh, cmd)
        if not data:
            raise FuseOSError(errno.EFAULT)
        ctypes.memmove(data, out, len(out))
        return 0

    def statfs(self, path: str) -> dict:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    def access(self, path: str, amode: int) -> int:
        if amode & 2:  # W_OK
            raise FuseOSError(errno.EROFS)
        return 0

    # Everything that would change anything: read-only file system.
    def _rofs(self, *args: object) -> None:
        raise FuseOSError(errno.EROFS)

    chmod = chown = create = link = mkdir = mknod = rename = rmdir = _rofs
    setxattr = removexattr = symlink = truncate = unlink = utimens = write = _rofs

    def readdir(self, path: str, fh: int) -> list:
        raise FuseOSError(errno.ENOTDIR)


TRIM_EVERY = 5.0  # s: trimming costs a few ms each time
IDLE_FORGET = 5.0  # s with nothing open before the kept snapshot and images are dropped


def _tame_malloc(device: Device, on_forget: Callable[[], None] = lambda: None) -> None:
    """The daemon's malloc settings (malloc.tune_malloc), and give freed memory back when
    idle: at once, or TRIM_EVERY s after the last trim. ``on_forget``: called once an idle
    spell dropped the device's images."""
    libc = tune_malloc()
    if libc is None:
        return
    lock = threading.Lock()
    state = {"last": 0.0, "timer": None, "forget": None}

    def trim_now() -> None:
        with lock:
            state["last"], state["timer"] = time.monotonic(), None
        libc.malloc_trim(0)

    def forget(wait: float) -> None:  # under lock: one idle-forget timer at a time
        if state["forget"] is None:
            t = state["forget"] = threading.Timer(wait, forget_now)
            t.daemon = True
            t.start()

    def forget_now() -> None:
        left = device.forget_idle(IDLE_FORGET)
        with lock:
            state["forget"] = None
            if left is not None:  # opened and closed again meanwhile: wait the rest
                forget(left)
                return
        on_forget()
        if not device.open_count():
            trim_now()

    def trim() -> None:
        with lock:
            forget(IDLE_FORGET)
            wait = state["last"] + TRIM_EVERY - time.monotonic()
            if wait > 0:
                if state["timer"] is None:  # one deferred trim at a time
                    t = state["timer"] = threading.Timer(wait, trim_now)
                    t.daemon = True
                    t.start()
                return
        trim_now()
    device.on_idle = trim


def copy_out(buf: object, image: object, served: int, size: int, offset: int) -> int:
    """Copy ``image[offset:offset+size]`` (a VirtualImage: stored parts and zeros), then
    zeros up to ``served``, into ``buf``."""
    n = max(0, min(size, served - offset)) if offset >= 0 else 0
    if not n:
        return 0
    dst = ctypes.cast(buf, ctypes.c_void_p).value
    k = image.copy_into(dst, offset, n)
    if n > k:
        ctypes.memset(dst + k, 0, n - k)
    return n


FUSE_ROOT_ID = 1  # the mount point itself: the only inode


class Notifier:
    """Kernel notifications for the mounted inode (libfuse 2.9 low-level notify calls)."""

    def __init__(self) -> None:
        self._lib = self._ch = None

    def attach(self, lib: ctypes.CDLL, ch: int) -> None:
        lib.fuse_lowlevel_notify_inval_inode.argtypes = [
            ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int64, ctypes.c_int64]
        self._lib, self._ch = lib, ch

    def inval(self, off: int, length: int = 0) -> int:
        """Drop cached pages from ``off`` (``length`` 0: to the end); ``off`` < 0: only the
        cached attributes (the next stat/fstat asks us). 0, or -errno."""
        if self._lib is None:
            return -errno.ENOTCONN
        return self._lib.fuse_lowlevel_notify_inval_inode(self._ch, FUSE_ROOT_ID, off, length)

    def inval_pages_soon(self) -> None:
        """inval(0) from another thread: the page being filled stays locked until our reply
        is written, and the kernel's invalidation waits for that lock."""
        threading.Thread(target=self.inval, args=(0,), daemon=True).start()


# the FUSE protocol as include/uapi/linux/fuse.h has it (libfuse 2.9's copy predates these)
FUSE_OPEN, FUSE_INIT = 14, 26                  # opcodes
FUSE_INIT_EXT = 1 << 30                        # fuse_init_in/out.flags: flags2 is valid
FUSE_PASSTHROUGH = 1 << (37 - 32)              # in flags2
FOPEN_NOFLUSH = 1 << 5                         # close() sends no FLUSH (Linux 5.16+)
FOPEN_PASSTHROUGH = 1 << 7
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501         # _IOW(229, 1, struct fuse_backing_map)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502        # _IOW(229, 2, uint32_t)
IN_HEADER = 40                                 # sizeof(struct fuse_in_header)
INIT_OUT = 64                                  # sizeof(struct fuse_init_out), 7.36+
CAP_SYS_ADMIN = 21


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_SEND = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(_Iovec),
                         ctypes.c_size_t)


class _ChanOps(ctypes.Structure):
    """libfuse 2.9 ``struct fuse_chan_ops`` (receive and destroy unused here)."""

    _fields_ = [("receive", ctypes.c_void_p), ("send", _SEND), ("destroy", ctypes.c_void_p)]


def may_passthrough(procfs: str = "/proc") -> bool:
    """Whether the kernel will register our backing files: CAP_SYS_ADMIN in the initial
    user namespace (fs/fuse/backing.c), whose uid_map alone maps every uid to itself."""
    try:
        with open(f"{procfs}/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
        with open(f"{procfs}/self/uid_map") as f:
            uid_map = f.read().split()
    except (OSError, StopIteration):
        return False
    return uid_map == ["0", "0", "4294967295"] and bool(
        int(caps.split()[1], 16) >> CAP_SYS_ADMIN & 1)


class Passthrough:
    """FUSE passthrough and FOPEN_NOFLUSH with libfuse 2.9, which predates both: the
    replies to INIT and OPEN go out through a channel of ours (``fuse_chan_new``) whose
    ``send`` asks for passthrough in the INIT reply (when ``wanted`` and the kernel offers
    it), names each open's backing file (a memfd of its image, registered with
    FUSE_DEV_IOC_BACKING_OPEN) in its OPEN reply, and asks for no FLUSH at close
    (``noflush``: the device then tells a reopen from a second open by the caller's fd
    table, holders.py). Every other reply goes through libfuse's own channel untouched."""

    def __init__(self, device: Device, wanted: bool, noflush: bool = False):
        self.device, self.wanted, self.noflush = device, wanted, noflush
        self._lock = threading.Lock()
        # id(image) -> (its file, backing id, the value of _made when it was made)
        self._files: dict[int, tuple[BackingFile, int, int]] = {}
        self._made = 0  # files made so far
        self._pending: dict[int, int] = {}  # fh -> the backing id its OPEN reply names
        self._tls = threading.local()
        self._fd, self._ch, self._offered = -1, None, False
        self._ops = _ChanOps(None, _SEND(self._send), None)  # kept alive with us
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.writev.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_int]
        self._libc.writev.restype = ctypes.c_ssize_t

    @property
    def active(self) -> bool:
        """The kernel agreed at INIT and has not refused a backing file since."""
        return self.device.passthrough

    def attach(self, lib: ctypes.CDLL, ch: int, mountpoint: str = "") -> None:
        """Make our channel on libfuse's /dev/fuse descriptor (``ch``: its channel); with
        ``noflush``, give the device its descriptor check for the mount at ``mountpoint``
        (no FLUSH is asked for if that mount's device number cannot be found)."""
        if self.noflush:
            # as libfuse mounted it (fuse_setup resolved it; resolving it again would
            # stat our own mount before any worker can answer)
            dev = mounted_dev(mountpoint) if mountpoint else None
            if dev is None:
                log.info("%s: mount not found in mountinfo; close() keeps its FLUSH",
                         mountpoint)
                self.noflush = False
            else:
                procfs = self.device.procfs
                self.device.holds = lambda tgid, tid: holds_descriptor((tgid, tid), dev,
                                                                       procfs)
        if not (self.wanted or self.noflush):
            return
        lib.fuse_chan_fd.argtypes = [ctypes.c_void_p]
        lib.fuse_chan_new.restype = ctypes.c_void_p
        lib.fuse_chan_new.argtypes = [ctypes.POINTER(_ChanOps), ctypes.c_int,
                                      ctypes.c_size_t, ctypes.c_void_p]
        self._fd = lib.fuse_chan_fd(ch)
        self._ch = lib.fuse_chan_new(ctypes.byref(self._ops), self._fd,
                                     lib.fuse_chan_bufsize(ch), None)

    def channel_for(self, addr: int, ch: int) -> int:
        """The channel to process the request at ``addr`` with: ours for INIT and OPEN."""
        opcode = ctypes.c_uint32.from_address(addr + 4).value
        if self._ch is None or opcode not in (FUSE_INIT, FUSE_OPEN):
            return ch
        if opcode == FUSE_INIT:
            length = ctypes.c_uint32.from_address(addr).value
            flags, flags2 = struct.unpack_from("=II", ctypes.string_at(
                addr + IN_HEADER + 12, 8)) if length >= IN_HEADER + 20 else (0, 0)
            self._offered = self.wanted and bool(flags & FUSE_INIT_EXT
                                                 and flags2 & FUSE_PASSTHROUGH)
            if self.wanted and not self._offered:
                log.info("FUSE passthrough: not offered by this kernel (6.9+ with "
                         "CONFIG_FUSE_PASSTHROUGH); reads go through the page cache")
        self._tls.opcode = opcode
        return self._ch

    def _send(self, ch: int, iov: object, count: int) -> int:
        try:
            op, self._tls.opcode = getattr(self._tls, "opcode", 0), 0
            if count >= 2 and ctypes.c_int32.from_address(iov[0].base + 4).value == 0:
                if op == FUSE_INIT and self._offered:
                    return self._send_init(iov)
                if op == FUSE_OPEN:
                    self._name_backing(iov[1].base)
                    if self.noflush:
                        ctypes.c_uint32.from_address(iov[1].base + 8).value |= FOPEN_NOFLUSH
            if self._libc.writev(self._fd, iov, count) < 0:
                return -ctypes.get_errno()
            return 0
        except Exception:  # noqa: BLE001  (a C callback must not raise)
            log.exception("sending a FUSE reply failed")
            return -errno.EIO

    def _send_init(self, iov: object) -> int:
        """libfuse's INIT reply (its 7.19 size), grown to 7.36's and asking passthrough."""
        out = bytearray(INIT_OUT)
        given = ctypes.string_at(iov[1].base, min(iov[1].len, INIT_OUT))
        out[:len(given)] = given
        flags = struct.unpack_from("=I", out, 12)[0] | FUSE_INIT_EXT
        struct.pack_into("=I", out, 12, flags)
        struct.pack_into("=II", out, 32, FUSE_PASSTHROUGH, 1)  # flags2, max_stack_depth
        unique = ctypes.c_uint64.from_address(iov[0].base + 8).value
        try:
            os.writev(self._fd, [struct.pack("=IiQ", 16 + INIT_OUT, 0, unique), out])
        except OSError as e:
            return -e.errno
        self.device.on_served = self.grow
        self.device.passthrough = True
        log.info("FUSE passthrough on: the kernel reads snapshots from memory files")
        return 0

    def _name_backing(self, open_out: int) -> None:
        fh = ctypes.c_uint64.from_address(open_out).value
        with self._lock:
            named = self._pending.pop(fh, None)
        if named is not None:
            ctypes.c_uint32.from_address(open_out + 8).value = FOPEN_PASSTHROUGH
            ctypes.c_int32.from_address(open_out + 12).value = named

    def prepare(self, fh: int) -> None:
        """Before the OPEN reply: register (or reuse) the backing file of the open's
        backing image, sized to the served size, for ``_send`` to name."""
        image = self.device.backing_of(fh)
        if not self.active or image is None:
            return
        with self._lock:
            entry = self._files.get(id(image))
            if entry is None:
                f = BackingFile(image, self.device.served_size)
                try:
                    arg = bytearray(struct.pack("=iIQ", f.fd, 0, 0))
                    self._made += 1
                    entry = (f, fcntl.ioctl(self._fd, FUSE_DEV_IOC_BACKING_OPEN, arg),
                             self._made)
                except OSError as e:
                    f.close()
                    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTTY):
                        raise
                    # the kernel agreed at INIT but will not take our files (a user
                    # namespace's root): the page cache from now on; this open goes direct
                    log.warning("FUSE passthrough off: registering a backing file failed "
                                "(errno %s)", errno.errorcode.get(e.errno, e.errno))
                    self.device.stop_passthrough(fh)
                    return
                except BaseException:
                    f.close()
                    raise
                self._files[id(image)] = entry
            entry[0].fit(self.device.served_size)
            self._pending[fh] = entry[1]

    def grow(self, size: int) -> None:
        """The served size grew (device.on_served, under its lock): so do the files, or a
        mapping as long as the new fstat size dies of SIGBUS past their end."""
        with self._lock:
            for f, _, _ in self._files.values():
                f.fit(max(f.size, size))

    def forget(self, fh: int) -> None:
        with self._lock:
            self._pending.pop(fh, None)

    def prune(self) -> None:
        """Let go of the backing files of images no open can be given any more (files the
        kernel still reads stay alive in it: it holds its own reference). An image that
        was not live is never handed out again; one made after we looked may be new."""
        if not self.active:
            return
        with self._lock:
            made = self._made
        live = self.device.live_images()
        with self._lock:
            gone = [self._files.pop(k) for k, (_, _, when) in list(self._files.items())
                    if k not in live and when <= made]
        for f, backing_id, _ in gone:
            try:
                fcntl.ioctl(self._fd, FUSE_DEV_IOC_BACKING_CLOSE,
                            bytearray(struct.pack("=I", backing_id)))
            except OSError as e:
                log.debug("closing backing file %d: errno %d", backing_id, e.errno)
            f.close()


class _ZeroCopyFUSE(FUSE):
    """fusepy's read copies twice (slice, then memmove); copy once, GIL released."""

    def read(self, path: bytes, buf: int, size: int, offset: int, fip: object) -> int:
        dev = self.operations.device
        fi = fip.contents
        try:  # no lock owner: the kernel fills its page cache (readahead, a mapping)
            image, drop = dev.image_for_read(fi.fh, fill=not fi.lock_owner)
        except KsymsError as e:
            return -e.errno
        # a fill is never short (zeros past the end, as the image's are): a short fill
        # makes the kernel shrink i_size (fuse_short_read), and a mapping dies of SIGBUS
        served = max(dev.served_size, offset + size) if not fi.lock_owner else dev.served_size
        n = copy_out(buf, image, served, size, offset)
        if drop:  # a direct open's mapping filled pages others read through the cache
            self.operations.notifier.inval_pages_soon()
        return n


FUSE_BUF_IS_FD = 1 << 1  # libfuse 2.9 enum fuse_buf_flags


class _FuseBuf(ctypes.Structure):
    """libfuse 2.9 ``struct fuse_buf``."""

    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int),
                ("mem", ctypes.c_void_p), ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _PooledLibfuse:
    """libfuse whose ``fuse_main_real`` serves requests on a fixed number of threads.

    libfuse 2's own loop starts one more worker whenever none is idle: 3,000 concurrent
    opens made 3,002 threads. Here ``threads`` workers each receive and process requests
    (what fuse_session_loop does), so the daemon never runs more.
    """

    def __init__(self, lib: ctypes.CDLL, threads: int, notifier: Notifier | None = None,
                 passthrough: Passthrough | None = None):
        self._lib, self.threads, self.notifier = lib, threads, notifier
        self.passthrough = passthrough
        lib.fuse_setup.restype = ctypes.c_void_p
        lib.fuse_setup.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_size_t, ctypes.POINTER(ctypes.c_char_p),
                                   ctypes.POINTER(ctypes.c_int), ctypes.c_void_p]
        for name in ("fuse_get_session", "fuse_session_next_chan"):
            getattr(lib, name).restype = ctypes.c_void_p
        lib.fuse_session_next_chan.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        for name in ("fuse_get_session", "fuse_session_exited", "fuse_session_exit",
                     "fuse_chan_bufsize"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.fuse_session_receive_buf.argtypes = [ctypes.c_void_p, ctypes.POINTER(_FuseBuf),
                                                 ctypes.POINTER(ctypes.c_void_p)]
        lib.fuse_session_process_buf.argtypes = [ctypes.c_void_p, ctypes.POINTER(_FuseBuf),
                                                 ctypes.c_void_p]
        lib.fuse_teardown.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

    def __getattr__(self, name: str) -> object:
        return getattr(self._lib, name)

    def fuse_main_real(self, argc: int, argv: object, ops: object, size: int,
                       user_data: object) -> int:
        lib, mnt, mt = self._lib, ctypes.c_char_p(), ctypes.c_int()
        f = lib.fuse_setup(argc, ctypes.cast(argv, ctypes.c_void_p), ctypes.cast(
            ops, ctypes.c_void_p), size, ctypes.byref(mnt), ctypes.byref(mt), None)
        if not f:
            return 1
        se = lib.fuse_get_session(f)
        ch = lib.fuse_session_next_chan(se, None)
        if self.notifier is not None:
            self.notifier.attach(lib, ch)
        if self.passthrough is not None:
            self.passthrough.attach(lib, ch, mnt.value.decode(errors="surrogateescape")
                                    if mnt.value else "")
        signal.signal(signal.SIGUSR1, lambda *_: None)  # only to interrupt a worker's read
        workers = [threading.Thread(target=self._work, args=(se, ch), daemon=True,
                                    name=f"fuse-{i}") for i in range(self.threads)]
        for w in workers:
            w.start()
        while not lib.fuse_session_exited(se) and any(w.is_alive() for w in workers):
            time.sleep(0.1)  # SIGINT/SIGTERM/SIGHUP: libfuse's handlers set "exited"
        if self.notifier is not None:  # cached pages must not outlive us: reads then fail
            drop = threading.Thread(target=self.notifier.inval, args=(0,), daemon=True)
            drop.start()
            drop.join(1)  # (it could wait for a page a queued read is filling)
        lib.fuse_session_exit(se)
        deadline = time.monotonic() + 5
        while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
            for w in workers:  # wake workers blocked reading /dev/fuse (EINTR)
                if w.is_alive() and w.ident is not None:
                    signal.pthread_kill(w.ident, signal.SIGUSR1)
            time.sleep(0.05)
        lib.fuse_teardown(f, mnt)
        return 0

    def _work(self, se: int, ch: int) -> None:
        lib = self._lib
        size = lib.fuse_chan_bufsize(ch)
        # an anonymous mapping: its pages cost memory only once a request touches them
        # (most requests are small; a zeroed ctypes buffer would cost 132 KB per thread)
        buf = mmap.mmap(-1, size)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        while not lib.fuse_session_exited(se):
            fbuf = _FuseBuf(size, 0, addr, -1, 0)
            tmpch = ctypes.c_void_p(ch)
            res = lib.fuse_session_receive_buf(se, ctypes.byref(fbuf), ctypes.byref(tmpch))
            if res == -errno.EINTR:
                continue
            if res <= 0:
                lib.fuse_session_exit(se)
                return
            if self.passthrough is not None and not fbuf.flags & FUSE_BUF_IS_FD:
                tmpch = ctypes.c_void_p(self.passthrough.channel_for(addr, tmpch.value))
            lib.fuse_session_process_buf(se, ctypes.byref(fbuf), tmpch)


def serve(device: Device, mountpoint: str, *, allow_other: bool = False, debug: bool = False,
          uid: int = 0, gid: int = 0, passthrough: bool = False) -> None:
    """Run the FUSE loop in the foreground until unmounted or SIGINT/SIGTERM (libfuse then
    unmounts); mount.py daemonizes before calling this. ``passthrough``: use FUSE
    passthrough where the kernel offers it and we may (see Passthrough)."""
    through = Passthrough(device, passthrough and may_passthrough(), noflush=True)
    if passthrough and not through.wanted:
        log.info("FUSE passthrough: needs CAP_SYS_ADMIN (root); reads go through the "
                 "page cache")
    _tame_malloc(device, through.prune)
    opts = {"allow_other": True} if allow_other else {}
    # a fixed pool: every open beyond --max-pending fails at once, so a few more threads
    # than that always remain for reads, flushes and releases
    lib = fuse_module._libfuse
    notifier = Notifier()
    fuse_module._libfuse = _PooledLibfuse(lib, device.max_pending + 4, notifier, through)
    try:
        _ZeroCopyFUSE(KsymsOperations(device, uid, gid, notifier, through), mountpoint,
                      raw_fi=True,
                      foreground=True, debug=debug, nothreads=False, ro=True,
                      default_permissions=True, fsname="ksymsfs", subtype="ksymsfs",
                      attr_timeout=0, entry_timeout=0, negative_timeout=0, **opts)
    finally:
        fuse_module._libfuse = lib
