"""Who may see real kernel addresses: the kernel's kallsyms_show_value(), evaluated per opener."""

from __future__ import annotations

import os
from dataclasses import dataclass

CAP_SYSLOG = 34


@dataclass(frozen=True)
class Sysctls:
    """The two knobs the kernel consults (kernel.kptr_restrict, kernel.perf_event_paranoid)."""

    kptr_restrict: int
    perf_event_paranoid: int


def read_sysctls(sysctl_dir: str = "/proc/sys/kernel") -> Sysctls:
    """Read the knobs; an unreadable knob counts as the most restrictive value."""
    def get(name: str, default: int) -> int:
        try:
            with open(os.path.join(sysctl_dir, name), "rb") as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
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
    """What /proc/<pid>/status says about a process."""

    tgid: int
    uid: int
    cap_syslog: bool


def process_creds(pid: int, procfs: str = "/proc") -> ProcessCreds | None:
    """Thread id -> thread group, effective uid, CAP_SYSLOG in CapEff. None if gone."""
    try:
        with open(os.path.join(procfs, str(pid), "status"), "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        tgid = int(fields["Tgid"])
        euid = int(fields["Uid"].split()[1])
        capeff = int(fields["CapEff"].strip(), 16)
    except (KeyError, ValueError, IndexError):
        return None
    return ProcessCreds(tgid, euid, bool(capeff >> CAP_SYSLOG & 1))
