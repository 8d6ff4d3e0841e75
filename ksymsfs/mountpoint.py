"""Mount-point files: what may be mounted on, which mount is ours, the per-path lock and the
record of a file a mount created (so umount, a failed mount and the daemon remove it)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
from dataclasses import dataclass

from .digest import sha256_hex
from .errors import KsymsError, MountPointError

FSTYPE = "fuse.ksymsfs"
MOUNTINFO = "/proc/self/mountinfo"
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFLNK: "a symbolic link"}


def canonical(path: str) -> str:
    """The mount point as mount(8) and the kernel record it: absolute, symlinks resolved."""
    return os.path.realpath(path)


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
                .replace("\\134", "\\")


def _topmost(path: str, mountinfo: str) -> list[str] | None:
    """The mountinfo fields of the topmost mount at ``path`` (already canonical), or None."""
    found = None
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == path and " - " in line:
                    found = fields
    except OSError:
        return None
    return found


def mounted_fstype(path: str, mountinfo: str = MOUNTINFO) -> str | None:
    """File system type of the topmost mount at ``path`` (already canonical), or None."""
    fields = _topmost(path, mountinfo)
    return None if fields is None else fields[fields.index("-", 6) + 1]


def mounted_dev(path: str, mountinfo: str = MOUNTINFO) -> str | None:
    """``major:minor`` of the topmost mount at ``path`` (already canonical), or None: its
    superblock's device, the same in every mount namespace and bind mount."""
    fields = _topmost(path, mountinfo)
    return None if fields is None else fields[2]


def check_file_type(path: str) -> bool:
    """True if ``path`` is a regular file, False if absent; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISREG(st.st_mode):
        return True
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
    raise MountPointError(f"{path}: is {kind}; the mount point must be a regular file "
                          "or absent (then it is created), e.g. /dev/ksyms")


def default_run_dir(euid: int, xdg_runtime_dir: str | None) -> str | None:
    """/run/ksymsfs for root, $XDG_RUNTIME_DIR/ksymsfs for others, else None (no lock)."""
    if euid == 0:
        return "/run/ksymsfs"
    return os.path.join(xdg_runtime_dir, "ksymsfs") if xdg_runtime_dir else None


def _key_path(run_dir: str, path: str, suffix: str) -> str:
    return os.path.join(run_dir, sha256_hex(path.encode("utf-8", "surrogateescape"))[:32]
                        + suffix)


def _ensure_run_dir(run_dir: str) -> None:
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    st = os.lstat(run_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise KsymsError(f"{run_dir}: not a directory owned by uid {os.geteuid()} and "
                         "writable only by it; remove it or pass --run-dir")


class PathLock:
    """flock(2) on ``RUN_DIR/<hash of path>.lock``: held from checking the mount point until
    it is mounted, and around every removal, so an immediate re-mount cannot race them."""

    def __init__(self, run_dir: str | None, path: str, timeout: float = 60):
        self.fd: int | None = None
        if run_dir is None:
            return
        _ensure_run_dir(run_dir)
        lock = _key_path(run_dir, path, ".lock")
        self.fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.release()
                    raise KsymsError(f"{path}: another ksymsfs is mounting or unmounting it "
                                     f"(lock {lock} held for {timeout:.0f} s)") from None
                time.sleep(0.01)

    def release(self) -> None:
        """Close our descriptor: the lock goes once no process holds a copy of it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> PathLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Created:
    """The mount-point file a mount created: removed when that mount goes, never a file
    that was there before. Kept in memory and, with a run dir, in RUN_DIR/<hash>.created."""

    path: str
    dev: int
    ino: int
    token: str


def _record_path(run_dir: str, path: str) -> str:
    return _key_path(run_dir, path, ".created")


def _read_record(run_dir: str | None, path: str) -> Created | None:
    if run_dir is None:
        return None
    try:
        with open(_record_path(run_dir, path)) as f:
            r = Created(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    return r if r.path == path else None


def _write_record(run_dir: str | None, rec: Created) -> None:
    if run_dir is None:
        return
    tmp = _record_path(run_dir, rec.path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec.__dict__, f)
    os.replace(tmp, _record_path(run_dir, rec.path))


def _same_file(rec: Created) -> bool:
    try:
        st = os.lstat(rec.path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (rec.dev, rec.ino)


def create_or_adopt(path: str, run_dir: str | None) -> Created | None:
    """Create the absent mount point (0444), or adopt one a ksymsfs mount created earlier
    (a stale mount's file); None for a file that existed before. Call under PathLock."""
    if not check_file_type(path):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o444)
        st = os.fstat(fd)
        os.close(fd)
        rec = Created(path, st.st_dev, st.st_ino, "")
    elif os.lstat(path).st_size:
        raise MountPointError(f"{path}: is a non-empty file: a mount would hide its content; "
                              "use an empty or absent path")
    else:
        rec = _read_record(run_dir, path)
        if rec is None or not _same_file(rec):
            return None
    rec.token = os.urandom(8).hex()
    _write_record(run_dir, rec)
    return rec


def remove_created(path: str, run_dir: str | None, mine: Created | None = None) -> bool:
    """Remove the file a mount created, if nothing is mounted on it and it is still that
    file. ``mine``: only if it is this mount's (the daemon); None: whichever ksymsfs mount
    created it (umount). Call under PathLock. True if it was removed."""
    rec = _read_record(run_dir, path)
    if mine is not None:
        if run_dir is not None and (rec is None or rec.token != mine.token):
            return False  # removed already, or a later mount owns the path now
        rec = mine
    if rec is None or mounted_fstype(path) is not None or not _same_file(rec):
        if rec is not None and not os.path.lexists(path) and run_dir is not None:
            _forget(run_dir, path)
        return False
    os.unlink(path)
    if run_dir is not None:
        _forget(run_dir, path)
    return True


def _forget(run_dir: str, path: str) -> None:
    try:
        os.unlink(_record_path(run_dir, path))
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
