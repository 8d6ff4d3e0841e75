"""Did one kallsyms read see a single kernel state? Change signals around it, and its shape.

/proc/kallsyms is a seq_file that finds module symbols by *position* (kernel/kallsyms.c
``update_iter_mod``: modules, then ftrace's freed init functions, then ``[bpf]``, then
``[__builtin__kprobes]``). A module that comes (inserted at the list head) or goes during
the read shifts every later position: lines are read twice or skipped. So the read is
bracketed by signals that move on any such change:

- ``/sys/kernel/uevent_seqnum``: KOBJ_REMOVE is sent before an unloading module leaves the
  list, KOBJ_ADD after a loading one appears (kernel/module/main.c); together with the
  two /proc/modules reads this catches an unload-reload at the same address (ABA);
- the eBPF program ids (``BPF_PROG_GET_NEXT_ID``, root only): a program removed during the
  read shifts the ``[bpf]`` region; and since an id is freed just *before* its kallsyms
  entry, the printed ``bpf_prog_*`` lines must all belong to programs still listed;

and the text must have the shape one state has (``shape_problem``), which catches a
module that appeared and vanished with no uevent (a load failing after COMING).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from dataclasses import dataclass

import numpy as np

from .arrays import sorted_unique
from .kallsyms import SymbolTable, is_pseudo_module
from .readfile import ValueFiles, read_value

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "i686": 357, "armv7l": 386}
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
PROG_INFO_LEN = 128            # struct bpf_prog_info up to jited_func_lens (uapi/linux/bpf.h)
INFO_NR_JITED_KSYMS = 104      # __u32 nr_jited_ksyms
INFO_JITED_KSYMS = 112         # __aligned_u64 jited_ksyms (user pointer to __u64[])


@dataclass(frozen=True)
class Signals:
    """What moves when the module list or the eBPF program list changes."""

    seqnum: bytes | None              # /sys/kernel/uevent_seqnum, None if absent
    bpf_ids: tuple[int, ...] | None   # eBPF program ids, None if they cannot be listed


def read_signals(seqnum_path: str | None, bpf: bool,
                 values: ValueFiles | None = None) -> Signals:
    """``values``: where the seqnum is read (kept open on sysfs); else opened each time.
    The programs' addresses are asked for only when a reading needs checking
    (bpf_prog_ksyms)."""
    return Signals(_read_seqnum(seqnum_path, values), bpf_prog_ids() if bpf else None)


def _read_seqnum(path: str | None, values: ValueFiles | None = None) -> bytes | None:
    if path is None:
        return None
    # one read: sysfs gives the whole value at once (a file: its first 64 bytes); a FIFO
    # never blocks us (open_regular)
    return values.read(path) if values is not None else read_value(path)


def moved(before: Signals, after: Signals) -> str:
    """Why the two readings differ ("" when nothing that shifts kallsyms happened)."""
    if before.seqnum != after.seqnum:
        return "a uevent was sent (module load/unload?) while kallsyms was read"
    if before.bpf_ids != after.bpf_ids:
        return "eBPF programs came or went while kallsyms was read"
    return ""


class _NextIdAttr(ctypes.Structure):
    """``union bpf_attr`` as BPF_PROG_GET_NEXT_ID reads it (start_id, next_id)."""

    _fields_ = [("start_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


_syscall = None  # libc's syscall(), its argument types set once (a cold call costs less)
_nr_bpf = None


def _bpf_call() -> tuple[object, int | None]:
    global _syscall, _nr_bpf
    if _syscall is None:
        fn = ctypes.CDLL(None, use_errno=True).syscall
        fn.restype = ctypes.c_long
        fn.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong]
        _nr_bpf, _syscall = _SYS_BPF.get(platform.machine()), fn
    return _syscall, _nr_bpf


def bpf_prog_ids() -> tuple[int, ...] | None:
    """Ids of the loaded eBPF programs, or None (not root, no bpf(2), unknown arch)."""
    call, nr = _bpf_call()
    if nr is None:
        return None
    attr = _NextIdAttr()
    where = ctypes.addressof(attr)
    ids = []
    while True:
        if call(nr, BPF_PROG_GET_NEXT_ID, where, ctypes.sizeof(attr)) != 0:
            return tuple(ids) if ctypes.get_errno() == 2 else None  # ENOENT: past the last
        ids.append(attr.next_id)
        attr.start_id = attr.next_id


def _bpf(cmd: int, attr) -> int:
    call, nr = _bpf_call()
    return call(nr, cmd, ctypes.addressof(attr), len(attr))


def bpf_prog_ksyms(ids: tuple[int, ...]) -> frozenset[int] | None:
    """Addresses of the programs' JITed functions (what kallsyms prints as
    ``bpf_prog_<tag>_<name> [bpf]``), or None if a program went away meanwhile."""
    out: set[int] = set()
    for i in ids:
        attr = ctypes.create_string_buffer(16)
        struct.pack_into("<I", attr, 0, i)
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, attr)
        if fd < 0:
            return None
        try:
            addrs = _prog_ksyms(fd)
        finally:
            os.close(fd)
        if addrs is None:
            return None
        out.update(addrs)
    return frozenset(out)


def _prog_ksyms(fd: int) -> list[int] | None:
    info = ctypes.create_string_buffer(PROG_INFO_LEN)
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<IIQ", attr, 0, fd, PROG_INFO_LEN, ctypes.addressof(info))
    if _bpf(BPF_OBJ_GET_INFO_BY_FD, attr) != 0:
        return None
    n = struct.unpack_from("<I", info, INFO_NR_JITED_KSYMS)[0]
    if n == 0:
        return []
    buf = (ctypes.c_uint64 * n)()
    info = ctypes.create_string_buffer(PROG_INFO_LEN)
    struct.pack_into("<I", info, INFO_NR_JITED_KSYMS, n)
    struct.pack_into("<Q", info, INFO_JITED_KSYMS, ctypes.addressof(buf))
    struct.pack_into("<IIQ", attr, 0, fd, PROG_INFO_LEN, ctypes.addressof(info))
    if _bpf(BPF_OBJ_GET_INFO_BY_FD, attr) != 0:
        return None
    return list(buf)


def bpf_lines_problem(table: SymbolTable, ksyms: frozenset[int] | None) -> str:
    """Every ``bpf_prog_*`` line must be a function of a program listed after the read.

    A program's id is freed before its kallsyms entry is deleted (kernel/bpf/syscall.c
    ``__bpf_prog_put``): one closed just before the ids were listed can still leave
    mid-read, after it was printed, and shift the ``[bpf]`` region (a later program is
    skipped) with both id lists equal. Its printed line has an address no listed
    program owns. (Listed programs without a line are normal: one loaded without
    CAP_BPF gets no kallsyms entry.)
    """
    if ksyms is None or "bpf" not in table.modules:
        return ""
    m = table.modules.index("bpf")
    sel = np.flatnonzero(table.module == m)
    got = {a for i, a in zip(sel.tolist(), table.addr[sel].tolist())
           if table.name(i).startswith("bpf_prog_")}
    extra = got - ksyms
    if not extra or not any(got):   # all zero: addresses hidden from this reader
        return ""
    return (f"{len(extra)} [bpf] program line(s) of no listed program: one left while "
            "kallsyms was read")


def bpf_ids_usable() -> bool:
    return os.geteuid() == 0 and bpf_prog_ids() is not None


def shape_problem(table: SymbolTable) -> str:
    """"" if the module lines could come from one state, else what is wrong.

    One state prints each module's lines as one run; the only second run a module can
    have is ftrace's list of its freed init functions, which follows all module runs.
    So: every module's runs are at most two, the second runs form one tail segment, and
    no module line appears twice (shifted positions re-read lines; kernel lines are not
    checked: vmlinux has exact duplicates such as ``__key.N``).
    """
    mod = table.module
    if len(mod) == 0 or not mod.any():
        return ""
    starts = np.flatnonzero(np.diff(mod, prepend=np.uint32(0xFFFFFFFF)) != 0)
    run_mod = mod[starts].tolist()
    seen: set[int] = set()
    tail = False
    tail_seen: set[int] = set()
    for m in run_mod:
        if m == 0 or is_pseudo_module(table.modules[m]):
            continue
        if m in seen:
            tail = True
            if m in tail_seen:
                return f"module {table.modules[m]} is printed in more than two runs"
            tail_seen.add(m)
        elif tail:
            return (f"module {table.modules[m]} starts after a repeated run: positions "
                    "shifted while kallsyms was read")
        else:
            seen.add(m)
    return _duplicate_module_line(table)


def _duplicate_module_line(table: SymbolTable) -> str:
    """Exact duplicate module lines (skipped when addresses are hidden: then they can be).

    Only lines sharing (module, address, letter) with another can be duplicates: those few
    are found by one sort, and only their names are compared, in kallsyms order."""
    sel = np.flatnonzero(table.module != 0)
    if not table.addr[sel].any():
        return ""
    mod, addr, letter = table.module[sel], table.addr[sel], table.letter[sel]
    order = np.lexsort((letter, addr, mod))
    same = np.flatnonzero((mod[order][1:] == mod[order][:-1])
                          & (addr[order][1:] == addr[order][:-1])
                          & (letter[order][1:] == letter[order][:-1]))
    if not same.size:
        return ""
    seen = set()
    for i in sel[sorted_unique(np.concatenate((order[same], order[same + 1])))].tolist():
        m, a, c = int(table.module[i]), int(table.addr[i]), int(table.letter[i])
        key = (m, a, c, table.name(i))
        if key in seen:
            return (f"line {a:x} {chr(c)} {key[3]} of module {table.modules[m]} is printed"
                    " twice: positions shifted while kallsyms was read")
        seen.add(key)
    return ""
