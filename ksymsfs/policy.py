"""Who may see real kernel addresses: the kernel's kallsyms_show_value(), evaluated per opener."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import SourceError
from .readfile import ValueFiles, read_regular, read_value

CAP_SYSLOG = 34


@dataclass(frozen=True)
class Sysctls:
    """The two knobs the kernel consults (kernel.kptr_restrict, kernel.perf_event_paranoid)."""

    kptr_restrict: int
    perf_event_paranoid: int


def read_sysctls(sysctl_dir: str = "/proc/sys/kernel",
                 values: ValueFiles | None = None) -> Sysctls:
    """Read the knobs; an unreadable knob counts as the most restrictive value.
    ``values``: read there (kept open on procfs), else each file is opened anew."""
    def get(name: str, default: int) -> int:
        path = os.path.join(sysctl_dir, name)
        data = values.read(path) if values is not None else read_value(path)
        try:
            return int(data.split()[0]) if data is not None else default
        except (ValueError, IndexError):
            return default
    return Sysctls(get("kptr_restrict", 2), get("perf_event_paranoid", 3))


def kallsyms_show_value(s: Sysctls, cap_syslog: bool) -> bool:
    """kernel/ksyms_common.c: kptr_restrict 0 -> perf_event_paranoid <= 1 or CAP_SYSLOG;
    1 -> CAP_SYSLOG; 2 -> nobody."""
    if s.kptr_restrict == 0 and s.perf_event_paranoid <= 1:
        return True
    if s.kptr_restrict <= 1 and cap_syslog:
        return True
    return False


@dataclass(frozen=True)
class ProcessCreds:
    """What /proc/<pid>/status and /proc/<pid>/ns/user say about a process.

    ``cap_syslog`` is CAP_SYSLOG *in the initial user namespace*, as the kernel asks for
    it (security_capable(cred, &init_user_ns, CAP_SYSLOG)): CapEff counts only when the
    process is in the daemon's own user namespace.
    """

    tgid: int
    uid: int
    cap_syslog: bool
    userns: str | None = None


def user_namespace(pid: int | str, procfs: str = "/proc") -> str | None:
    """``user:[inode]`` of a process's user namespace, None if unreadable."""
    try:
        return os.readlink(os.path.join(procfs, str(pid), "ns", "user"))
    except OSError:
        return None


def _status_field(status: bytes, name: bytes) -> bytes:
    """The value of ``Name:`` at the start of a line of /proc/<pid>/status (the kernel
    escapes newlines in the one free-text field, the task name); ValueError if absent."""
    key = b"\n" + name + b":"
    i = status.find(key)
    if i < 0:
        raise ValueError(f"no {name.decode()} field")
    i += len(key)
    j = status.find(b"\n", i)
    return status[i:j] if j >= 0 else status[i:]


def process_creds(pid: int, procfs: str = "/proc",
                  init_userns: str | None = None) -> ProcessCreds | None:
    """Thread id -> thread group, effective uid, CAP_SYSLOG as the kernel sees it. None if
    gone. ``init_userns`` is the namespace counted as initial (default: the caller's own,
    ``procfs/self``): a process in any other has no CAP_SYSLOG whatever its CapEff says.
    """
    status = read_small(os.path.join(procfs, str(pid), "status"))
    if status is None:
        return None
    status = b"\n" + status  # every field, the first too, follows a newline
    try:  # three fields found by name (splitting all ~55 lines cost 12 us of every open)
        tgid = int(_status_field(status, b"Tgid"))
        euid = int(_status_field(status, b"Uid").split()[1])
        capeff = int(_status_field(status, b"CapEff"), 16)
    except (ValueError, IndexError):
        return None
    ns = user_namespace(pid, procfs)
    if init_userns is None:
        init_userns = user_namespace("self", procfs)
    in_init = ns is not None and ns == init_userns
    return ProcessCreds(tgid, euid, bool(capeff >> CAP_SYSLOG & 1) and in_init, ns)


def read_small(path: str) -> bytes | None:
    """A small procfs/sysctl file, or None; never blocks on a FIFO planted there."""
    try:
        return read_regular(path, 1 << 16)
    except SourceError:
        return None
