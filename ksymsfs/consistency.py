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
  read shifts the ``[bpf]`` region;

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

from .kallsyms import SymbolTable, is_pseudo_module

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "i686": 357, "armv7l": 386}
BPF_PROG_GET_NEXT_ID = 11


@dataclass(frozen=True)
class Signals:
    """What moves when the module list or the eBPF program list changes."""

    seqnum: bytes | None              # /sys/kernel/uevent_seqnum, None if absent
    bpf_ids: tuple[int, ...] | None   # eBPF program ids, None if they cannot be listed


def read_signals(seqnum_path: str | None, bpf: bool) -> Signals:
    return Signals(_read_seqnum(seqnum_path), bpf_prog_ids() if bpf else None)


def _read_seqnum(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def moved(before: Signals, after: Signals) -> str:
    """Why the two readings differ ("" when nothing that shifts kallsyms happened)."""
    if before.seqnum != after.seqnum:
        return "a uevent was sent (module load/unload?) while kallsyms was read"
    if before.bpf_ids != after.bpf_ids:
        return "eBPF programs came or went while kallsyms was read"
    return ""


_libc = None


def bpf_prog_ids() -> tuple[int, ...] | None:
    """Ids of the loaded eBPF programs, or None (not root, no bpf(2), unknown arch)."""
    global _libc
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(16)
    ids, start = [], 0
    while True:
        struct.pack_into("<II", attr, 0, start, 0)
        if _libc.syscall(nr, BPF_PROG_GET_NEXT_ID, attr, 16) != 0:
            err = ctypes.get_errno()
            return tuple(ids) if err == 2 else None   # ENOENT: past the last id
        start = struct.unpack_from("<II", attr, 0)[1]
        ids.append(start)


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
    """Exact duplicate module lines (skipped when addresses are hidden: then they can be)."""
    sel = np.flatnonzero(table.module != 0)
    if not table.addr[sel].any():
        return ""
    seen = set()
    for i, m, a, c in zip(sel.tolist(), table.module[sel].tolist(),
                          table.addr[sel].tolist(), table.letter[sel].tolist()):
        key = (m, a, c, table.name(i))
        if key in seen:
            return (f"line {a:x} {chr(c)} {key[3]} of module {table.modules[m]} is printed"
                    " twice: positions shifted while kallsyms was read")
        seen.add(key)
    return ""
