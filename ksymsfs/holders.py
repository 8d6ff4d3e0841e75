"""Does a process still hold a descriptor of the device? Its fd tables, read from /proc.

The device asks the kernel for no FLUSH at close (``FOPEN_NOFLUSH``: a FLUSH is a round
trip every ``close()`` waits for), so it learns that a process closed its descriptor
only from the RELEASE, which comes asynchronously, and not at all while a mapping, a
child or a passed descriptor keeps the open alive. When a process that holds a snapshot
opens again, this tells the two cases apart: a descriptor on our mount is still in its
table (a second open: shared or EBUSY), or it is not (it closed; its RELEASE is on the
way or something else holds the open). A descriptor is ours when its mount
(``mnt_id`` in ``fdinfo``, looked up in the process's own ``mountinfo``) has our
superblock's device number, which every mount namespace and bind mount shares; the
mount serves a single file, so any descriptor on it is the device.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .errors import SourceError
from .readfile import read_regular

MAX_FDS = 4096  # descriptors looked at per table: beyond, the answer is "not held"


def holds_descriptor(pids: Iterable[int], dev: str, procfs: str = "/proc",
                     max_fds: int = MAX_FDS) -> bool:
    """Whether the fd table of any of ``pids`` (a process, a thread with a table of its
    own) has a descriptor on the mount whose device is ``dev`` (``major:minor``).
    Unreadable or vanished tables, and tables past ``max_fds``, count as not holding:
    the caller then waits for a RELEASE instead of handing out an old snapshot."""
    for pid in dict.fromkeys(pids):
        mounts = _fd_mounts(f"{procfs}/{pid}", max_fds)
        if mounts and dev in _mount_devs(f"{procfs}/{pid}/mountinfo", mounts):
            return True
    return False


def _fd_mounts(task: str, max_fds: int) -> set[bytes]:
    """The ``mnt_id`` of every descriptor in the table ("" when it cannot be read)."""
    out: set[bytes] = set()
    try:
        with os.scandir(f"{task}/fdinfo") as it:
            for n, entry in enumerate(it):
                if n >= max_fds:
                    return set()
                info = _read_small(entry.path, 1 << 16)
                at = info.find(b"\nmnt_id:")
                if at >= 0:
                    end = info.find(b"\n", at + 8)
                    out.add(info[at + 8:end if end >= 0 else len(info)].strip())
    except OSError:
        return set()
    return out


def _mount_devs(mountinfo: str, mounts: set[bytes]) -> set[str]:
    """``major:minor`` of the mounts with these ids in a process's mount namespace."""
    devs = set()
    for line in _read_small(mountinfo, 1 << 24).splitlines():
        fields = line.split(None, 3)
        if len(fields) > 2 and fields[0] in mounts:
            devs.add(fields[2].decode("ascii", "replace"))
    return devs


def _read_small(path: str, limit: int) -> bytes:
    """A procfs file of at most ``limit`` bytes ("" if it went away, a descriptor closed
    meanwhile, or is larger)."""
    try:
        return read_regular(path, limit, missing_ok=True) or b""
    except SourceError:
        return b""
