"""The FUSE adapter (the only module importing fusepy): delegate to Device, map errors to errno."""

from __future__ import annotations

import ctypes
import errno
import logging
import stat
import time

from fuse import FUSE, FuseOSError, Operations, fuse_file_info, fuse_get_context

from .device import Device
from .errors import KsymsError

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

    def __init__(self, device: Device, uid: int, gid: int):
        self.device = device
        self.uid, self.gid = uid, gid

    def __call__(self, op: str, *args: object) -> object:
        try:
            return super().__call__(op, *args)
        except FuseOSError:
            raise
        except Exception as e:  # noqa: BLE001  every failure becomes an errno, logged
            err = _errno_of(e)
            (log.debug if isinstance(e, KsymsError) else log.exception)(
                "%s failed: %s (errno %s)", op, e, errno.errorcode.get(err, err))
            raise FuseOSError(err) from None

    def getattr(self, path: str, fh: object = None) -> dict:
        if path != "/":
            raise FuseOSError(errno.ENOENT)
        _uid, _gid, pid = fuse_get_context()
        t = int(self.device.mtime * 1e9)
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_uid": self.uid,
                "st_gid": self.gid, "st_size": self.device.size_for(pid),
                "st_atime": t, "st_mtime": t, "st_ctime": t, "st_blksize": 4096}

    def open(self, path: str, fi: fuse_file_info) -> int:
        _uid, _gid, pid = fuse_get_context()
        fi.fh = self.device.open(pid, fi.flags)
        fi.direct_io = True   # every read reaches us with this open's handle
        fi.keep_cache = False
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
        self.device.release(fi.fh)
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


def _tame_malloc(device: Device) -> None:
    """Few malloc arenas for FUSE's worker threads, and give freed memory back when idle."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        last = [0.0]

        def trim() -> None:  # at most every 5 s: trimming costs a few ms each time
            now = time.monotonic()
            if now - last[0] > 5:
                last[0] = now
                libc.malloc_trim(0)
        device.on_idle = trim
    except (OSError, AttributeError):
        pass


class _ZeroCopyFUSE(FUSE):
    """fusepy's read copies twice (slice, then memmove); copy once, GIL released."""

    def read(self, path: bytes, buf: int, size: int, offset: int, fip: object) -> int:
        try:
            image = self.operations.device.image_of(fip.contents.fh)
        except KsymsError as e:
            return -e.errno
        address = ctypes.cast(buf, ctypes.c_void_p).value  # buf: a ctypes pointer
        return image.copy_into(address, offset, size)  # stored bytes and zeros (VirtualImage)


def serve(device: Device, mountpoint: str, *, allow_other: bool = False, debug: bool = False,
          uid: int = 0, gid: int = 0) -> None:
    """Run the FUSE loop in the foreground until unmounted or SIGINT/SIGTERM (libfuse then
    unmounts); mount.py daemonizes before calling this."""
    _tame_malloc(device)
    opts = {"allow_other": True} if allow_other else {}
    _ZeroCopyFUSE(KsymsOperations(device, uid, gid), mountpoint, raw_fi=True, foreground=True,
         debug=debug, nothreads=False, ro=True, default_permissions=True,
         fsname="ksymsfs", subtype="ksymsfs", attr_timeout=0, entry_timeout=0,
         negative_timeout=0, **opts)
