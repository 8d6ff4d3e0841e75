"""Make the live kernel change for real (modules, eBPF via bpf(2), kprobes, ftrace); guest only."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
from pathlib import Path

SYS_BPF = 321            # x86_64
SYS_FINIT_MODULE = 313
SYS_DELETE_MODULE = 176
BPF_PROG_LOAD = 5
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_TYPE_SOCKET_FILTER = 1
O_NONBLOCK = os.O_NONBLOCK
TRACEFS = "/sys/kernel/tracing"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(nr: int, *args) -> int:
    r = _libc.syscall(nr, *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def bpf_load_trivial(name: str = "ksymsfs_t") -> int:
    """Load ``r0 = 0; exit`` as an eBPF socket filter; returns its fd (close it to unload)."""
    insns = struct.pack("<BBhi", 0xb7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    ibuf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQII16s", attr, 0, BPF_PROG_TYPE_SOCKET_FILTER, 2,
                     ctypes.addressof(ibuf), ctypes.addressof(lic), 0, 0, 0, 0, 0,
                     name.encode()[:15])
    return _syscall(SYS_BPF, BPF_PROG_LOAD, attr, 128)


def bpf_prog_ids() -> list[int]:
    attr = ctypes.create_string_buffer(16)
    out, start = [], 0
    while True:
        struct.pack_into("<II", attr, 0, start, 0)
        try:
            _syscall(SYS_BPF, BPF_PROG_GET_NEXT_ID, attr, 16)
        except OSError:
            return out
        start = struct.unpack_from("<II", attr, 0)[1]
        out.append(start)


def module_load(path: str, params: str = "") -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _syscall(SYS_FINIT_MODULE, fd, ctypes.c_char_p(params.encode()), 0)
    finally:
        os.close(fd)


def module_unload(name: str) -> None:
    _syscall(SYS_DELETE_MODULE, ctypes.c_char_p(name.encode()), O_NONBLOCK)


def modprobe(modroot: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["modprobe", "-d", modroot, *args], capture_output=True, text=True)


def module_path(modroot: str, name: str) -> str:
    r = modprobe(modroot, "--show-depends", name)
    return r.stdout.strip().splitlines()[-1].split()[1]


def tracefs() -> Path:
    t = Path(TRACEFS)
    if not (t / "kprobe_events").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)
    return t


def kprobe_add(func: str, name: str = "ksymsfs_kp", max_off: int = 64) -> int:
    """A kprobe at the first non-entry offset the kernel accepts; returns the offset."""
    ev = tracefs() / "kprobe_events"
    errs = set()
    for off in range(1, max_off):
        fd = os.open(ev, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"p:{name} {func}+{off}\n".encode())
        except OSError as e:
            errs.add(e.strerror)
            continue
        finally:
            os.close(fd)
        (tracefs() / "events" / "kprobes" / name / "enable").write_text("1\n")
        return off
    raise OSError(f"no kprobe offset accepted in {func}+1..{max_off}: {sorted(errs)}")


def kprobe_clear(name: str = "ksymsfs_kp") -> None:
    t = tracefs()
    (t / "events" / "kprobes" / name / "enable").write_text("0\n")
    with open(t / "kprobe_events", "a") as f:
        f.write(f"-:{name}\n")


def function_tracer(on: bool, func: str = "vfs_read") -> None:
    t = tracefs()
    if on:
        (t / "set_ftrace_filter").write_text(func + "\n")
        (t / "current_tracer").write_text("function\n")
    else:
        (t / "current_tracer").write_text("nop\n")
        (t / "set_ftrace_filter").write_text("\n")
